"""The per-user (leave-last-k-out) split of `ckv data prepare --split per-user` (pipeline/data/split.py):
no leakage, every user with enough events has test samples, the validator catches a broken split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.jobs.prepare import data
from collectivekv.pipeline.data.build import build_dataset
from collectivekv.pipeline.data.dataset_schema import (
    SPLITS,
    CanonicalDataset,
    DataError,
    load_dataset,
    validate_dataset,
)
from collectivekv.pipeline.data.split import split_kind

ROWS = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 8), st.integers(0, 6), st.integers(0, 1)),
                min_size=1, max_size=60)


def _events(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "label"]).astype(
        {"user": "int64", "item": "int64", "timestamp": "int64", "label": "int8"})


def _by_user(ds: CanonicalDataset, split: str) -> dict[int, list[tuple[int, int, int]]]:
    out: dict[int, list[tuple[int, int, int]]] = {}
    for r in ds.samples[split].to_pylist():
        out.setdefault(r["user_id"], []).append((r["item_id"], r["timestamp"], r["label"]))
    return out


@settings(max_examples=40, deadline=None)
@given(ROWS, st.integers(1, 3), st.integers(1, 3))
def test_per_user_split_is_leave_last_k_out_without_leakage(rows: list[tuple[int, int, int, int]], k_valid: int,
                                                            k_test: int) -> None:
    events = _events(rows)
    ds = build_dataset(events, split="per-user", per_user=(k_valid, k_test))
    validate_dataset(ds)
    assert split_kind(ds.meta) == "per-user" and ds.meta["splits"]["min_events"] == k_valid + k_test + 1
    hist = {r["user_id"]: r for r in ds.histories.to_pylist()}
    per_split = {s: _by_user(ds, s) for s in SPLITS}
    for user, h in hist.items():
        seq = list(zip(h["items"], h["timestamps"], h["labels"], strict=True))  # history order
        n = len(seq)
        if n >= k_valid + k_test + 1:  # exactly the user's last events, as multisets
            assert Counter(per_split["test"][user]) == Counter(seq[n - k_test:])
            assert Counter(per_split["valid"][user]) == Counter(seq[n - k_test - k_valid:n - k_test])
        else:  # too few events: every event trains
            assert user not in per_split["test"] and user not in per_split["valid"]
            assert len(per_split["train"][user]) == n
    first_held_out = {u: len(h["items"]) - k_valid - k_test for u, h in hist.items()
                      if len(h["items"]) >= k_valid + k_test + 1}
    for split in SPLITS:
        for r in ds.samples[split].to_pylist():
            h = hist[r["user_id"]]
            # the history is the user's events strictly before the sample
            assert all(t < r["timestamp"] for t in h["timestamps"][: r["hist_len"]])
            assert r["hist_len"] == sum(t < r["timestamp"] for t in h["timestamps"])
            if split == "train" and r["user_id"] in first_held_out:  # training never sees valid/test events
                assert r["hist_len"] <= first_held_out[r["user_id"]]


def test_every_user_with_enough_events_has_test_samples_and_global_stays_default(tmp_path: Path) -> None:
    rows = [(u, 1 + (u * e) % 7, 10 * e + (e % 3 == 0), (u + e) % 2) for u in range(1, 9) for e in range(u + 2)]
    pd.DataFrame(rows, columns=["userId", "movieId", "timestamp", "click"]).to_csv(tmp_path / "e.csv", index=False)
    base = ["prepare", "--events", str(tmp_path / "e.csv"), "--label-col", "click"]
    res = CliRunner().invoke(data, [*base, "--out", str(tmp_path / "pu"), "--split", "per-user",
                                    "--user-valid-events", "2", "--user-test-events", "3"])
    assert res.exit_code == 0, res.output
    assert "per-user split: each user's last 3 events test" in res.output
    ds = load_dataset(tmp_path / "pu")  # validates
    meta = json.loads((tmp_path / "pu" / "meta.json").read_text())
    assert meta["splits"] == {"kind": "per-user", "valid_events": 2, "test_events": 3, "min_events": 6}
    n_events = {u: u + 2 for u in range(1, 9)}
    test_users = set(ds.samples["test"]["user_id"].to_pylist())
    assert test_users == {u for u, n in n_events.items() if n >= 6}
    assert ds.samples["test"].num_rows == 3 * len(test_users)
    assert sum(meta["split_fractions"]) == pytest.approx(1.0, abs=1e-5)
    res = CliRunner().invoke(data, [*base, "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    g = load_dataset(tmp_path / "g")
    assert split_kind(g.meta) == "global" and g.meta["splits"]["kind"] == "global"
    res = CliRunner().invoke(data, [*base, "--out", str(tmp_path / "bad"), "--split", "per-user",
                                    "--user-test-events", "0"])
    assert res.exit_code != 0 and "need >= 1" in res.output


def test_validator_catches_a_broken_per_user_split() -> None:
    rows = [(u, e % 5 + 1, e, e % 2) for u in (1, 2) for e in range(8)]
    ds = build_dataset(_events(rows), split="per-user", per_user=(2, 2))
    validate_dataset(ds)
    test, train = ds.samples["test"], ds.samples["train"]
    moved = {**ds.samples, "test": test.slice(1), "train": pa.concat_tables([train, test.slice(0, 1)])
             .sort_by([("timestamp", "ascending"), ("user_id", "ascending"), ("item_id", "ascending")])}
    with pytest.raises(DataError, match="per-user split"):
        validate_dataset(CanonicalDataset(ds.meta, ds.items, ds.histories, moved))
    old = {k: v for k, v in ds.meta["splits"].items() if k != "kind"}
    assert split_kind({"splits": old}) == "global"  # datasets written before the kind was recorded


def test_a_fraction_of_zero_is_an_empty_split() -> None:
    """--test-frac 0 (and --valid-frac 0 with it): the boundary lies past the last event, not on it."""
    import numpy as np

    from collectivekv.pipeline.data.build import split_boundaries

    ts = np.arange(100, dtype=np.int64) * 10
    assert split_boundaries(ts, 0.1, 0.0) == (900, 991)
    assert split_boundaries(ts, 0.0, 0.0) == (991, 991)
    assert split_boundaries(ts, 0.1, 0.1) == (800, 900)
