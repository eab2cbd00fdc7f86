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
