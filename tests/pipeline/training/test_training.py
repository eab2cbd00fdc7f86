"""Training job and checkpoints on a tiny prepared dataset (CPU, seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.checkpoint import CheckpointError, load_checkpoint
from collectivekv.jobs.cli import main
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.data.history import HistoryIndex, last_window
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from collectivekv.pipeline.training.trainer import TrainConfig, build_model, predict, train_model

TINY = ["--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--pool-size", "32", "--max-len", "10",
        "--epochs", "2", "--batch-size", "256", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic event log (60 users × 30 events, 50 items with genres) prepared by the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        taste = rng.integers(0, 2)
        for e in range(30):
            item = int(rng.integers(1, 51))
            rows.append(
                (u + 1, item, float(rng.integers(1, 6)) if (item % 2 == taste) else 1.0, 1000 * e + u)
            )
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(
        root / "r.csv", index=False
    )
    pd.DataFrame({"movieId": range(1, 51), "title": "t", "genres": ["A|B", "C"] * 25}).to_csv(
        root / "m.csv", index=False
    )
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(root / "r.csv"), "--items", str(root / "m.csv"),
                                    "--out", str(root / "data")])  # fmt: skip
    assert res.exit_code == 0, res.output
    return root / "data"


def test_last_window_takes_latest_behaviours_in_time_order() -> None:
    items = np.arange(1, 11)
    labels = np.array([0, 1] * 5)
    w = last_window(items, labels, np.array([0, 2, 5]), np.array([7, 2, 6]), 4)
    assert w.lengths.tolist() == [4, 0, 1]
    assert w.items.tolist() == [[4, 5, 6, 7], [0, 0, 0, 0], [6, 0, 0, 0]]
    assert w.feedback.tolist() == [[2, 1, 2, 1], [0, 0, 0, 0], [2, 0, 0, 0]]


def test_train_checkpoint_round_trip_and_warm_start(tiny_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ckpt"
    res = runner.invoke(main, ["train", "--data", str(tiny_data), "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["catalogue.parquet", "config.json", "metrics.json", "weights.safetensors"]
    ck = load_checkpoint(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_version"] == ck.model_version
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    # the loaded model reproduces the trained model's predictions exactly
    ds = load_dataset(tiny_data)
    probs = predict(ck.model, HistoryIndex(ds.histories), ds.samples["test"], 512)
    assert probs.shape == (ds.samples["test"].num_rows,) and np.isfinite(probs).all()
    # warm start: same config → starts from the checkpoint's weights
    out2 = tmp_path / "ckpt2"
    res = runner.invoke(
        main, ["train", "--data", str(tiny_data), "--out", str(out2), "--init-from", str(out), *TINY]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out2 / "metrics.json").read_text())["init_from"] == str(out)
    # warm start with another shape is refused clearly
    bad = [*TINY]
    bad[bad.index("--pool-size") + 1] = "16"
    res = runner.invoke(
        main, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--init-from", str(out), *bad]
    )
    assert res.exit_code != 0 and "config differs" in res.output


def test_training_is_deterministic_for_a_seed(tiny_data: Path) -> None:
    ds = load_dataset(tiny_data)
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=10,
                      collective=CollectiveConfig(pool_size=32))  # fmt: skip
    tc = TrainConfig(epochs=1, batch_size=256, progress=False, seed=3)
    a = train_model(build_model(ds, cfg, 3), ds, tc)
    b = train_model(build_model(ds, cfg, 3), ds, tc)
    # equal up to float summation order of multi-threaded CPU kernels
    assert a.test == pytest.approx(b.test, rel=1e-6)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)


def test_checkpoint_tampering_is_detected(tiny_data: Path, tmp_path: Path) -> None:
    ds = load_dataset(tiny_data)
    cfg = ModelConfig(
        n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=10, collective=CollectiveConfig(pool_size=32)
    )
    model = build_model(ds, cfg)
    save_checkpoint(tmp_path / "c", model, {})
    conf = json.loads((tmp_path / "c" / "config.json").read_text())
    conf["model"]["collective"]["pool_size"] = 64  # config no longer matches the weights
    (tmp_path / "c" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "c")
    save_checkpoint(tmp_path / "d", build_model(ds, replace(cfg, kv_mode="full")), {})
    conf = json.loads((tmp_path / "d" / "config.json").read_text())
    conf["model_version"] = "0" * 16
    (tmp_path / "d" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(tmp_path / "d")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_experiment_writes_results_table(tiny_data: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["experiment", "--data", str(tiny_data), "--out", str(tmp_path / "exp"),
                                    "--seeds", "0,1", "--variants", "full,collective", *TINY])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert set(report["summary"]) == {"full", "collective"}
    coll = report["summary"]["collective"]
    # d_u = 1, fp16 user K and V (2 × 2 B) + two uint16 indices (2 × 2 B) vs 2 × 16 × 4 B
    assert coll["cache_bytes_per_behaviour"] == 8 and coll["cr"] == pytest.approx(8 / 128)
    assert len(report["runs"]) == 4
    assert "| collective | 2 |" in (tmp_path / "exp" / "results.md").read_text()
    # the settings each run used, as its checkpoint has them: the dataset's sizes, not the template's
    for run in report["runs"]:
        ckpt = json.loads((tmp_path / "exp" / "checkpoints" / f"{run['variant']}-seed{run['seed']}" /
                           "config.json").read_text())["model"]
        assert run["model"] == ckpt == report["variants"][run["variant"]]
        assert (run["model"]["n_items"], run["model"]["n_genres"]) == (50, 3)


def test_eval_and_train_turn_the_same_options_into_the_same_model_config(tiny_data: Path, tmp_path: Path) -> None:
    """``ckv eval``'s base config comes from the builder ``ckv train`` uses: the same model options give
    the same config (apart from the item and genre counts, which training takes from the data); a bad --d-user is a
    usage error naming the option in both."""
    opts = ["--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--max-len", "12", "--long-len", "40",
            "--topk", "6", "--pool-size", "32", "--dropout", "0.1", "--peak-weight", "0.02",
            "--balance-weight", "0.5", "--hstu-layers", "1"]
    runner = CliRunner()
    res = runner.invoke(main, ["eval", "--report-only", "--data", str(tiny_data), "--out", str(tmp_path / "ev"),
                               "--sections", "table3", "--seeds", "0", *opts])
    assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]["base"]
    res = runner.invoke(main, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "ck"), "--epochs", "1",
                               "--no-progress", "--d-user", "1", *opts])
    assert res.exit_code == 0, res.output
    trained = json.loads((tmp_path / "ck" / "config.json").read_text())["model"]
    data_fields = {"n_items": 1, "n_genres": 0, "max_genres": 1}  # set from the dataset by training
    assert {**trained, **data_fields} == {**base, **data_fields}
    for command in (["eval", "--report-only"], ["train", "--out", str(tmp_path / "ck2")]):
        res = runner.invoke(main, [*command, "--data", str(tiny_data), "--d-user", "two"])
        assert res.exit_code == 2 and "--d-user" in res.output, res.output


def test_damaged_checkpoint_metadata_is_a_checkpoint_error(tiny_data: Path, tmp_path: Path) -> None:
    ds = load_dataset(tiny_data)
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=10,
                      collective=CollectiveConfig(pool_size=32))
    save_checkpoint(tmp_path / "c", build_model(ds, cfg), {"test": {"gauc": float("nan")}})
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["test"]["gauc"] is None  # JSON has no NaN
    (tmp_path / "c" / "metrics.json").write_text('{"test": ')
    with pytest.raises(CheckpointError, match="metrics.json: unreadable"):
        load_checkpoint(tmp_path / "c")
    save_checkpoint(tmp_path / "d", build_model(ds, cfg), {})
    conf = json.loads((tmp_path / "d" / "config.json").read_text())
    conf["model"]["embed_dim"] = "8"  # a string where a number belongs
    (tmp_path / "d" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "d")


def test_a_diverging_loss_stops_training_with_its_cause(tiny_data: Path) -> None:
    from collectivekv.pipeline.training.trainer import TrainingDiverged

    ds = load_dataset(tiny_data)
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=10,
                      collective=CollectiveConfig(pool_size=32))
    with pytest.raises(TrainingDiverged, match="try a lower --lr"):
        train_model(build_model(ds, cfg), ds, TrainConfig(epochs=3, batch_size=256, lr=1e8, progress=False))


@pytest.mark.parametrize(("keep", "metric"), [("one label each", "auc"), ("clicks", "logloss"), ("none", "epoch")])
def test_epochs_are_ranked_by_a_metric_the_valid_split_defines(tiny_data: Path, keep: str, metric: str) -> None:
    """Validation GAUC needs a user with both labels; without one the epochs are ranked by AUC, then logloss, then
    kept to the last (ranking by NaN kept epoch 1)."""
    import pyarrow.compute as pc

    from collectivekv.pipeline.training.trainer import stopping_metric

    ds = load_dataset(tiny_data)
    valid = ds.samples["valid"]
    assert stopping_metric(valid) == "gauc"
    users, labels = valid["user_id"].to_numpy(), valid["label"].to_numpy()
    a = users[labels == 1][0]
    b = users[(labels == 0) & (users != a)][0]
    picked = {"one label each": ((users == a) & (labels == 1)) | ((users == b) & (labels == 0)),
              "clicks": labels == 1, "none": np.zeros(len(users), bool)}[keep]
    small = valid.filter(pc.equal(np.asarray(picked), True))
    assert stopping_metric(small) == metric
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=10, kv_mode="full")
    r = train_model(build_model(ds, cfg), replace(ds, samples={**ds.samples, "valid": small}),
                    TrainConfig(epochs=2, patience=2, batch_size=256, progress=False))
    assert r.stopped_on == metric and r.metrics()["stopped_on"] == metric
    assert r.best_epoch == 2 if metric == "epoch" else r.best_epoch in (1, 2)


@pytest.mark.parametrize(("args", "message"), [
    (["experiment", "--seeds", "0,0"], "each once"), (["experiment", "--seeds", ""], "at least one value"),
    (["experiment", "--variants", "full,full"], "a variant named twice"), (["eval", "--seeds", "a"], "integers"),
    (["train", "--device", "gpu"], "expected cpu, cuda"), (["train", "--epochs", "0"], "'--epochs'"),
    (["eval", "--batch-size", "0"], "'--batch-size'")])
def test_bad_training_options_are_usage_errors(tiny_data: Path, tmp_path: Path, args: list, message: str) -> None:
    res = CliRunner().invoke(main, [args[0], "--data", str(tiny_data), "--out", str(tmp_path / "o"), *args[1:]])
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "o").exists()


def test_eval_refuses_an_out_that_holds_other_files_or_its_input(tiny_data: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("# my notes\n")
    for out, message in ((mine, "not empty and not an evaluation"), (tiny_data, "is the input")):
        res = CliRunner().invoke(main, ["eval", "--quick", "--data", str(tiny_data), "--out", str(out), "--models",
                                        "din", "--sections", "table1"])
        assert res.exit_code == 1 and message in res.output
    assert (mine / "results.md").read_text() == "# my notes\n" and not (tiny_data / "runs").exists()
