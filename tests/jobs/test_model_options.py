"""The CLI's model options → ModelConfig in one place (jobs/train.py: build_model_config): per-event features
parse from ``--event-features gap,hour``; a bad name is a usage error naming the choices, not a traceback."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from collectivekv.jobs.cli import main as cli
from collectivekv.jobs.train import build_model_config

BASE = {"d_user": "1", "pool_size": 64, "share": "both", "peak_weight": 0.01, "balance_weight": 1.0, "embed_dim": 8,
        "d_attn": 16, "heads": 2, "max_len": 10, "arch": "din", "long_len": 100, "topk": 5, "hash_bits": 16,
        "sdim_hashes": 4, "sdim_bits": 4, "hstu_layers": 2}


def test_event_feature_options() -> None:
    cfg = build_model_config("collective", {**BASE, "event_features": "gap, hour", "gap_buckets": 8})
    assert cfg.event_features == ("gap", "hour") and cfg.gap_buckets == 8 and cfg.n_feedback == 385
    assert build_model_config("full", BASE).event_features == ()
    with pytest.raises(click.BadParameter, match="'weekday' is not one of"):
        build_model_config("collective", {**BASE, "event_features": "weekday"})


def test_train_refuses_an_unknown_feature_in_one_line(tmp_path) -> None:  # noqa: ANN001
    movielens = Path(__file__).resolve().parents[2] / "data" / "movielens"
    r = CliRunner().invoke(cli, ["data", "prepare", "--events", str(movielens / "ratings.csv"), "--out",
                                 str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ckpt"),
                                 "--event-features", "weekday"])
    assert r.exit_code == 2 and "'weekday' is not one of ('gap', 'hour')" in r.output and "Traceback" not in r.output


def test_half_cache_options(tmp_path) -> None:  # noqa: ANN001
    """--kv-index joint --user-dtype int8 reach the ModelConfig (and its checkpoint); a joint index with one side
    shared is a usage error; the sharing sweeps fall back to separate indices."""
    from collectivekv.model.config import with_sharing

    cfg = build_model_config("collective", {**BASE, "kv_index": "joint", "user_dtype": "int8"})
    assert cfg.joint_index and cfg.int8_user
    assert build_model_config("collective", BASE).kv_index == "separate"
    with pytest.raises(click.BadParameter, match="both K and V shared"):
        build_model_config("collective", {**BASE, "share": "k", "kv_index": "joint"})
    k_only = with_sharing(cfg, True, False)
    assert k_only.kv_index == "separate" and k_only.user_dtype == "int8" and not k_only.collective.share_v
    movielens = Path(__file__).resolve().parents[2] / "data" / "movielens"
    r = CliRunner().invoke(cli, ["data", "prepare", "--events", str(movielens / "ratings.csv"), "--out",
                                 str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ckpt"),
                                 "--epochs", "1", "--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--max-len",
                                 "10", "--pool-size", "64", "--kv-index", "joint", "--user-dtype", "int8",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    from collectivekv.cachestore.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "ckpt").model
    assert model.cfg.kv_index == "joint" and model.cfg.user_dtype == "int8"
    assert float(model.k_branch.user_scale) > 0 and float(model.v_branch.user_scale) > 0
