"""Training the zoo models: the trainer trains and checkpoints every model (the checkpoint predicts as the trained
model does); `ckv train --d-user auto`; `ckv eval --quick` (tables, plots, resume, ``--report-only``); the
regularisation options of `ckv eval` reach every planned run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.zoo import MODELS, PAPER_MODELS
from tests.model.zoo_helpers import zoo_config


# ------------------------------------------------------------------------------ training + checkpoint
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from collectivekv.pipeline.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        taste = rng.integers(0, 2)
        for e in range(int(rng.integers(5, 40))):
            item = int(rng.integers(1, 41))
            rows.append((u + 1, item, 5.0 if item % 2 == taste else 1.0, 1000 * e + u))
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(root / "r.csv", index=False)
    pd.DataFrame({"movieId": range(1, 41), "title": "t", "genres": ["A|B", "C", "B|D", "(no genres listed)"] * 10}
                 ).to_csv(root / "m.csv", index=False)  # fmt: skip
    prepare(PrepareConfig(events=root / "r.csv", items=root / "m.csv", out=root / "data", rating_col="rating",
                          rating_threshold=4.0))  # fmt: skip
    return root / "data"


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_trainer_trains_and_checkpoints_every_zoo_model(arch: str, tiny_dataset: Path, tmp_path: Path) -> None:
    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.pipeline.data.dataset_schema import load_dataset
    from collectivekv.pipeline.data.history import HistoryIndex
    from collectivekv.pipeline.training.checkpoint import save_checkpoint
    from collectivekv.pipeline.training.trainer import TrainConfig, build_model, predict, train_model

    ds = load_dataset(tiny_dataset)
    cfg = zoo_config(arch, long_len=30, max_len=8 if arch != "hstu" else 16)
    result = train_model(build_model(ds, cfg, 0), ds, TrainConfig(epochs=1, batch_size=128, progress=False))
    assert type(result.model) is MODELS[arch] and 0.0 <= result.test["auc"] <= 1.0
    save_checkpoint(tmp_path / "ck", result.model, result.metrics())
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config.arch == arch
    index = HistoryIndex(ds.histories)
    torch.testing.assert_close(
        torch.from_numpy(predict(ck.model, index, ds.samples["test"], 64)),
        torch.from_numpy(predict(result.model, index, ds.samples["test"], 256)),
    )


# ------------------------------------------------------------------------------------------- CLIs
def test_ckv_train_zoo_arch_with_d_user_auto(tiny_dataset: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.jobs.cli import main

    args = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "ck"), "--arch", "eta", "--d-user", "auto",
            "--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--pool-size", "16", "--max-len", "5",
            "--long-len", "20", "--topk", "4", "--epochs", "1", "--batch-size", "128", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(tmp_path / "ck")
    auto = ck.metrics["d_user_auto"]
    assert ck.config.arch == "eta" and ck.config.collective.d_user == auto["d_user"] >= 1
    assert set(auto["groups"]) == {"short.k", "short.v", "long.k", "long.v"}


def test_ckv_eval_quick_writes_tables_plots_and_resumes(tiny_dataset: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    args = ["eval", "--quick", "--data", str(tiny_dataset), "--out", str(tmp_path / "ev"), "--models", "sim,hstu",
            "--sections", "table1,table3,fig4,fig5,auto", "--d-user", "auto"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "ev"
    report = json.loads((out / "results.json").read_text())
    assert {e["arch"] for e in report["sections"]["table1"]} == {"sim", "hstu"}
    assert len(report["sections"]["table3"]) == 5 and report["auto_vs_fixed"]["arch"] == "sim"
    assert (out / "fig4_d_user.png").stat().st_size > 0 and (out / "fig5_pool.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "QUICK SMOKE RUN" in md and "| SIM | collective |" in md
    n_runs = len(list((out / "runs").glob("*.json")))
    res = CliRunner().invoke(main, args)  # every run is on disk: nothing is trained again
    assert res.exit_code == 0 and "to train" not in res.output
    assert len(list((out / "runs").glob("*.json"))) == n_runs
    # --report-only over a partial evaluation: remove the HSTU collective runs, report without training
    hstu_coll = [p for p in (out / "runs").glob("*.json")
                 if json.loads(p.read_text())["arch"] == "hstu" and json.loads(p.read_text())["config"]["kv_mode"]
                 == "collective"]  # fmt: skip
    assert hstu_coll
    for p in hstu_coll:
        p.unlink()
    res = CliRunner().invoke(main, [*args, "--report-only"])
    assert res.exit_code == 0, res.output
    assert "run(s) to train" not in res.output and len(list((out / "runs").glob("*.json"))) == n_runs - len(hstu_coll)
    md = (out / "results.md").read_text()
    assert "| HSTU | collective | | pending (not run yet)" in md and "- table1: hstu collective" in md
    assert json.loads((out / "results.json").read_text())["pending"] == ["table1: hstu collective"]


def test_eval_regularisation_options_reach_every_run_and_table3_keeps_the_paper_weights() -> None:
    """`ckv eval --dropout --weight-decay --peak-weight --balance-weight`: every planned run carries them
    (new run ids, so earlier results are not reused for other settings); Table 3's "+loss" rows still
    switch a loss on at the paper's weight when the base has it off."""
    from collectivekv.pipeline.training.trainer import TrainConfig
    from collectivekv.pipeline.training.zoo_eval import EvalSettings, plan_rows
    from collectivekv.pipeline.training.zoo_eval_runs import run_id

    base = ModelConfig(n_items=50, embed_dim=16, d_attn=32, n_heads=2, max_len=10, long_len=40, topk=5,
                       collective=CollectiveConfig(d_user=1, pool_size=64))
    plain = EvalSettings(base=base, train=TrainConfig(), sections=("table1", "table3"), models=("sim",))
    reg = dataclasses.replace(
        plain, train=TrainConfig(weight_decay=1e-5),
        base=dataclasses.replace(base, dropout=0.3,
                                 collective=dataclasses.replace(base.collective, balance_weight=0.0)))
    rows = {(r.section, r.label): r.cfg for r in plan_rows(reg)}
    coll = rows[("table1", "collective")]
    assert coll.dropout == 0.3 and coll.collective.balance_weight == 0.0 and coll.collective.peak_weight == 0.01
    assert rows[("table1", "full")].dropout == 0.3
    assert rows[("table3", "+balance loss")].collective.balance_weight == 1.0
    assert rows[("table3", "+all losses")].collective.balance_weight == 1.0
    assert rows[("table3", "CollectiveKV (no router losses)")].collective.peak_weight == 0.0
    old = {(r.section, r.label): r.cfg for r in plan_rows(plain)}
    assert run_id(coll, 0, reg.train) != run_id(old[("table1", "collective")], 0, plain.train)
    assert run_id(old[("table3", "+all losses")], 0, plain.train) == run_id(old[("table1", "collective")], 0,
                                                                            plain.train)  # shared as before
