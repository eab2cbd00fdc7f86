"""Evaluation quality: per-user GAUC parts and the paired bootstrap interval (pipeline/training/paired.py),
training diagnostics (model/diagnostics.py, pipeline/training/diagnostics.py) on a tiny run (CPU, seconds)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.diagnostics import GradientCounter, RoutingProbe, usage_summary
from collectivekv.model.metrics import gauc, per_user_auc
from collectivekv.pipeline.data.build import build_dataset
from collectivekv.pipeline.training.paired import (
    UserAUC,
    bootstrap_seeds_and_users,
    bootstrap_weighted_mean,
    paired_difference,
    paired_report,
)
from collectivekv.pipeline.training.trainer import TrainConfig, build_model, train_model


def _runs(seed: int, n_users: int = 30, per_user: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users) * 7 + 3, per_user)
    labels = rng.integers(0, 2, len(users))
    scores = labels * 0.3 + rng.random(len(users))
    return users, labels, scores


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(2, 15))
def test_per_user_parts_give_gauc_and_paired_difference_is_the_gauc_difference(seed: int, n_users: int,
                                                                               per_user: int) -> None:
    users, labels, a_scores = _runs(seed, n_users, per_user)
    b_scores = np.random.default_rng(seed + 1).random(len(users))
    u, n, a = per_user_auc(users, labels, a_scores)
    if len(u) == 0:
        assert np.isnan(gauc(users, labels, a_scores))
        return
    assert (n * a).sum() / n.sum() == pytest.approx(gauc(users, labels, a_scores), abs=1e-12)
    ra, rb = UserAUC.of(users, labels, a_scores), UserAUC.of(users, labels, b_scores)
    p = paired_difference([(ra, rb)], n_boot=200)
    assert p["diff"] == pytest.approx(gauc(users, labels, a_scores) - gauc(users, labels, b_scores), abs=1e-12)
    assert p["lo"] <= p["diff"] + 1e-12 and p["diff"] <= p["hi"] + 1e-12 and p["users"] == len(u)


def test_identical_runs_give_zero_and_a_known_shift_gives_itself() -> None:
    users, labels, scores = _runs(0)
    run = UserAUC.of(users, labels, scores)
    p = paired_difference([(run, run), (run, run)])
    assert (p["diff"], p["lo"], p["hi"]) == (0.0, 0.0, 0.0) and p["pairs"] == 2 and p["resamples"] == 1000
    shifted = replace(run, auc=run.auc + 0.01)
    p = paired_difference([(shifted, run)])
    assert p["diff"] == pytest.approx(0.01) and p["lo"] == pytest.approx(0.01) and p["hi"] == pytest.approx(0.01)
    assert p["share_le_0"] == 0.0
    # a shift on half the users: the interval straddles the mean shift and is reproducible (fixed seed)
    half = replace(run, auc=run.auc + np.where(np.arange(len(run.auc)) % 2 == 0, 0.02, 0.0))
    p1, p2 = paired_difference([(half, run)]), paired_difference([(half, run)])
    assert p1 == p2 and p1["lo"] < p1["diff"] < p1["hi"] and p1["lo"] > 0 and p1["hi"] < 0.02


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    rng = np.random.default_rng(5)
    d = rng.normal(0.003, 0.05, 2000)
    w = np.ones_like(d)
    boot = bootstrap_weighted_mean(d, w, 2000, 0)
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert boot.std() == pytest.approx(se, rel=0.1) and boot.mean() == pytest.approx(d.mean(), abs=se / 5)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 60))
def test_two_level_bootstrap_is_the_users_bootstrap_for_one_seed_and_covers_seed_spread(seed: int, n: int) -> None:
    """One seed pair: the two-level resamples are the users-only ones, draw for draw. Seeds that disagree by more
    than the users' noise: the two-level interval is wider than the users-only one and still contains Δ."""
    rng = np.random.default_rng(seed)
    d, w = rng.normal(0.002, 0.02, n), rng.integers(1, 20, n).astype(np.float64)
    assert np.array_equal(bootstrap_seeds_and_users(d[None], w, 300, 7), bootstrap_weighted_mean(d, w, 300, 7))
    spread = np.stack([d + 0.05, d, d - 0.05])  # (S, U): three seeds far apart
    two = np.quantile(bootstrap_seeds_and_users(spread, w, 1000, 0), [0.025, 0.975])
    users = np.quantile(bootstrap_weighted_mean(spread.mean(0), w, 1000, 0), [0.025, 0.975])
    mean = (w * d).sum() / w.sum()
    assert two[1] - two[0] > users[1] - users[0] and two[0] <= mean <= two[1]


def test_paired_report_pools_the_shared_seeds_and_round_trips(tmp_path: Path) -> None:
    runs = {s: UserAUC.of(*_runs(s)) for s in (0, 1, 2)}
    better = {s: replace(r, auc=r.auc + 0.005 * (s + 1)) for s, r in runs.items() if s != 2}
    rep = paired_report(better, runs)
    assert rep is not None and rep["seeds"] == [0, 1]
    assert [x["diff"] for x in rep["per_seed"]] == pytest.approx([0.005, 0.010])
    assert rep["pooled"]["diff"] == pytest.approx(0.0075) and rep["pooled"]["pairs"] == 2
    two = rep["pooled"]["two_level"]  # seeds 0.005 and 0.010 apart, users' noise none: the seeds set the interval
    assert two["lo"] == pytest.approx(0.005) and two["hi"] == pytest.approx(0.010) and two["share_le_0"] == 0.0
    assert paired_report({}, runs) is None
    runs[0].save(tmp_path / "u.json")
    back = UserAUC.load(tmp_path / "u.json")
    assert back is not None and np.array_equal(back.users, runs[0].users)
    assert np.allclose(back.auc, runs[0].auc, atol=1e-6) and UserAUC.load(tmp_path / "missing.json") is None


def test_usage_summary_and_gradient_counter() -> None:
    s = usage_summary(torch.tensor([0.0] * 98 + [1.0, 1.0]))
    assert s["rows_used"] == pytest.approx(0.02) and s["top1pct_share"] == pytest.approx(0.5)
    assert s["effective_rows"] == pytest.approx(2.0)
    assert usage_summary(torch.ones(50))["usage_entropy_norm"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny() -> object:
    rng = np.random.default_rng(0)
    rows = [(u, int(rng.integers(1, 41)), 100 * e + u, int(rng.integers(0, 2))) for u in range(40) for e in range(25)]
    events = pd.DataFrame(rows, columns=["user", "item", "timestamp", "label"]).astype(
        {"user": "int64", "item": "int64", "timestamp": "int64", "label": "int8"})
    return build_dataset(events, split="per-user", per_user=(4, 4))


def _cfg(arch: str, kv_mode: str = "collective") -> ModelConfig:
    return ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=10, mlp_dims=(8,), long_len=30, topk=5,
                       hstu_layers=1, arch=arch, kv_mode=kv_mode,  # type: ignore[arg-type]
                       collective=CollectiveConfig(d_user=1, pool_size=32))


@pytest.mark.parametrize("arch", ["din", "sim", "hstu"])
def test_training_diagnostics_present_in_range_and_free_of_side_effects(tiny: object, arch: str) -> None:
    train = TrainConfig(epochs=2, batch_size=128, patience=5, progress=False, probe_samples=64)
    res = train_model(build_model(tiny, _cfg(arch), 0), tiny, train)  # type: ignore[arg-type]
    d = res.diagnostics
    assert d is not None and d["train_samples"] == tiny.samples["train"].num_rows  # type: ignore[attr-defined]
    assert 0 < d["rows_used"] <= 1 and 0 < d["top1pct_share"] <= 1 and 0 <= d["usage_entropy_norm"] <= 1
    assert 0 <= d["router_entropy_norm"] <= 1 and 0 < d["router_max_prob"] <= 1 and 0 < d["gate_gap"] < 1
    assert 0 < d["grad_last_epoch"]["grad_rows"] <= 1 and d["grad_last_epoch"]["steps"] > 0
    assert all(p["behaviours"] > 0 for p in d["pools"].values())
    for row in res.history:
        assert {"valid_gauc", "valid_auc", "valid_logloss", "router_entropy_norm", "gate_gap", "grad_rows"} <= set(row)
        assert 0 < row["grad_rows"] <= 1 and 0 <= row["router_entropy_norm"] <= 1
    assert res.test_users is not None and res.test_users.gauc == pytest.approx(res.test["gauc"], abs=1e-9)
    off = train_model(build_model(tiny, _cfg(arch), 0), tiny, replace(train, diagnostics=False))  # type: ignore[arg-type]
    assert off.diagnostics is None and off.test == res.test  # probing does not change training
    full = train_model(build_model(tiny, _cfg(arch, "full"), 0), tiny, replace(train, epochs=1))  # type: ignore[arg-type]
    assert full.diagnostics is None and "grad_rows" not in full.history[0]


def test_probe_counts_every_behaviour_and_gradient_rows_are_the_routed_rows(tiny: object) -> None:
    model = build_model(tiny, _cfg("din"), 0)  # type: ignore[arg-type]
    items = torch.tensor([[1, 2, 2, 0], [3, 0, 0, 0]])
    feedback = torch.tensor([[1, 2, 2, 0], [1, 0, 0, 0]])
    lengths = torch.tensor([3, 1])
    model.eval()
    with torch.no_grad(), RoutingProbe(model) as probe:
        cache = model.prefill(items, feedback, lengths)
    s = probe.summary()
    assert set(s["pools"]) == {"k_branch", "v_branch"} and all(p["behaviours"] == 4 for p in s["pools"].values())
    routed = set(cache.k_idx[0, :3].tolist()) | set(cache.k_idx[1, :1].tolist())
    assert s["pools"]["k_branch"]["rows_used"] * 32 == pytest.approx(len(routed))
    assert model.k_branch.probe is None  # detached on exit
    model.train()
    counter = GradientCounter(model)
    logits, losses = model(items, feedback, lengths, torch.tensor([4, 5]))
    model.loss(logits, torch.tensor([1.0, 0.0]), losses).backward()
    counter.after_backward()
    g = counter.take()
    assert g["steps"] == 1 and 0 < g["pools"]["k_branch"]["grad_rows"] * 32 <= 3


@pytest.fixture(scope="module")
def per_user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic event log (50 users × 30 events) prepared by the CLI with the per-user split."""
    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    root = tmp_path_factory.mktemp("pu")
    rng = np.random.default_rng(1)
    rows = [(u + 1, int(rng.integers(1, 41)), 1000 * e + u, float(rng.integers(1, 6))) for u in range(50)
            for e in range(30)]
    pd.DataFrame(rows, columns=["userId", "movieId", "timestamp", "rating"]).to_csv(root / "r.csv", index=False)
    pd.DataFrame({"movieId": range(1, 41), "title": "t", "genres": ["A|B", "C"] * 20}).to_csv(root / "m.csv",
                                                                                                 index=False)
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(root / "r.csv"), "--items", str(root / "m.csv"),
                                    "--out", str(root / "data"), "--split", "per-user", "--user-test-events", "6",
                                    "--user-valid-events", "6"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return root / "data"


def test_ckv_eval_reports_split_paired_interval_and_diagnostics(per_user_dir: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    out = tmp_path / "ev"
    args = ["eval", "--quick", "--data", str(per_user_dir), "--out", str(out), "--models", "sim",
            "--sections", "table1", "--split", "per-user"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "results.json").read_text())
    assert report["data"]["splits"]["kind"] == "per-user" and report["data"]["test_users"] == 50
    full, coll = sorted(report["sections"]["table1"], key=lambda e: e["kv_mode"] == "collective")
    pooled = coll["paired"]["pooled"]
    assert pooled["lo"] <= pooled["diff"] <= pooled["hi"] and pooled["resamples"] == 1000
    assert pooled["diff"] == pytest.approx(coll["gauc"]["mean"] - full["gauc"]["mean"], abs=1e-5)
    assert full["paired"] is None and full["diagnostics"] is None and coll["diagnostics"]["n"] == 1
    assert 0 < coll["diagnostics"]["rows_used"]["mean"] <= 1 and coll["curve"][0]["valid_gauc"] > 0
    assert len(list((out / "runs" / "users").glob("*.json"))) == len(list((out / "runs").glob("*.json"))) == 2
    md = (out / "results.md").read_text()
    for text in ("Split: per user (leave-last-k-out)", "## Paired GAUC difference", "## Training diagnostics",
                 "## Per-epoch curves", "paired Δ [95% CI]"):
        assert text in md
    assert "pooled Δ [95% CI over seeds and users]" in md
    res = CliRunner().invoke(main, [*args[:-2], "--split", "global"])
    assert res.exit_code != 0 and "has a per-user split" in res.output


def test_report_only_keeps_the_training_command(per_user_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A report re-rendered from finished runs (--report-only, any number of times) names the command that trained
    them, and the one that rendered it."""
    import json

    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    out = tmp_path / "ev"
    args = ["eval", "--quick", "--data", str(per_user_dir), "--out", str(out), "--models", "sim",
            "--sections", "table1", "--split", "per-user", "--seeds", "0"]
    again = [*args, "--report-only"]
    for argv in (args, again, again):
        monkeypatch.setattr(sys, "argv", ["ckv", *argv])  # the command line the report records
        res = CliRunner().invoke(main, argv)
        assert res.exit_code == 0, res.output
        report, md = json.loads((out / "results.json").read_text()), (out / "results.md").read_text()
        assert report["command"] == "ckv " + " ".join(argv)
        assert f"Command: `ckv {' '.join(args)}`" in md
        if argv is again:
            assert report["trained_by"] == "ckv " + " ".join(args)
            assert f"Report rendered from its finished runs by: `ckv {' '.join(again)}`" in md
        else:
            assert "trained_by" not in report and "Report rendered" not in md
    res = CliRunner().invoke(main, [*args[:-2], "--split", "global"])
    assert res.exit_code != 0 and "has a per-user split" in res.output


def test_eval_reuses_a_run_only_for_its_dataset_and_section(per_user_dir: Path, tmp_path: Path) -> None:
    """A finished run in --out serves a later call on the same dataset; one that needs the d_u choice (auto) is
    trained again when the record has none; a record of another dataset is refused, never reported as this one's."""
    import json
    import shutil

    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    out = tmp_path / "ev"
    args = ["eval", "--quick", "--data", str(per_user_dir), "--out", str(out), "--models", "din", "--seeds", "0",
            "--sections", "table1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    res = CliRunner().invoke(main, [*args[:-1], "table1,auto"])
    assert res.exit_code == 0, res.output
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert any("auto" in r for r in records) and all(r["data"] == records[0]["data"] for r in records)
    other = Path(shutil.copytree(per_user_dir, tmp_path / "other"))
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "label_rule": "another rule"}))
    res = CliRunner().invoke(main, [*args[:3], str(other), *args[4:]])
    assert res.exit_code == 1 and "a run trained on another dataset" in res.output


def test_ckv_experiment_writes_paired_and_diagnostics(per_user_dir: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    args = ["experiment", "--data", str(per_user_dir), "--out", str(tmp_path / "x"), "--seeds", "0",
            "--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--pool-size", "32", "--max-len", "10",
            "--epochs", "1", "--batch-size", "256", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "x" / "results.json").read_text())
    assert report["split"]["kind"] == "per-user"
    coll = report["summary"]["collective"]
    assert coll["paired_vs_full"]["pooled"]["users"] > 0 and coll["diagnostics"]["gate_gap"]["mean"] > 0
    assert report["summary"]["full"]["paired_vs_full"] is None
    assert sorted(p.name for p in (tmp_path / "x" / "users").iterdir()) == ["collective-seed0.json", "full-seed0.json"]
    assert "## Paired GAUC difference (variant − full" in (tmp_path / "x" / "results.md").read_text()


def test_paired_report_is_none_without_shared_users_and_refuses_other_samples() -> None:
    """Leave-one-out test splits have no user with both labels: no pairs, no crash; runs scored on different
    samples (a user's n differs) have no paired difference."""
    from collectivekv.pipeline.training.paired import paired_report

    a = UserAUC(np.array([1, 2]), np.array([4, 6]), np.array([0.6, 0.7]))
    b = UserAUC(np.array([3]), np.array([4]), np.array([0.5]))
    assert paired_report({0: a}, {0: b}) is None
    other_n = UserAUC(np.array([1, 2]), np.array([4, 5]), np.array([0.5, 0.7]))
    with pytest.raises(ValueError, match="scored different test samples"):
        paired_report({0: a}, {0: other_n})
