"""`ckv data prepare --impressions FILE [--history FILE]` (pipeline/data/impressions.py): impression logs as news and
feed datasets publish them. The example below is the one docs/data_schema.md shows; the tests write it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collectivekv.cachestore.store.user_keys import BLAKE2B_63, key_of
from collectivekv.jobs.cli import main
from collectivekv.pipeline.data.dataset_schema import CanonicalDataset, DataError, load_dataset
from collectivekv.pipeline.data.prepare import PrepareConfig, prepare

IMPRESSIONS_TSV = """\
user\ttime\tshown\tclicked
U1\t2019-11-11T09:00:00Z\tN1 N2 N3\tN2
U2\t2019-11-11T09:05:00Z\tN2 N4\t
U1\t2019-11-12T10:00:00Z\tN4 N5\tN5 N1
"""
HISTORY_TSV = """\
user\titem
U1\tN7 N8
U2\tN1
"""
T0 = int(pd.Timestamp("2019-11-11T09:00:00Z").timestamp())
T1, T2 = T0 + 300, T0 + 25 * 3600
# (user, item, time, label) of every event the example gives, in time order per user
EXPECTED = {
    "U1": [("N7", T0 - 1, 1), ("N8", T0 - 1, 1), ("N1", T0, 0), ("N2", T0, 1), ("N3", T0, 0), ("N4", T2, 0),
           ("N5", T2, 1), ("N1", T2, 1)],
    "U2": [("N1", T0 - 1, 1), ("N2", T1, 0), ("N4", T1, 0)],
}


def write_example(tmp: Path) -> tuple[Path, Path]:
    imp, hist = tmp / "impressions.tsv", tmp / "history.tsv"
    imp.write_text(IMPRESSIONS_TSV)
    hist.write_text(HISTORY_TSV)
    return imp, hist


def _prep(tmp: Path, impressions: Path, history: Path | None = None, out: str = "out", **cfg: object
          ) -> CanonicalDataset:
    base: dict = {"user_col": "user", "time_col": "time", "item_col": "item"}
    base.update(cfg)
    prepare(PrepareConfig(events=None, impressions=impressions, history=history, out=tmp / out, **base))  # type: ignore[arg-type]
    return load_dataset(tmp / out)


def _events(ds: CanonicalDataset) -> dict[str, list[tuple[str, int, int]]]:
    """user text id → [(item text id, time, label)] from the histories (time order)."""
    names = {key_of(u): u for u in ("U1", "U2", "U3")}
    out = {}
    for row in ds.histories.to_pylist():
        items = ds.item_catalogue.name_of(np.array(row["items"])).tolist()
        out[names[row["user_id"]]] = list(zip(items, row["timestamps"], row["labels"], strict=True))
    return out


def test_example_impressions_and_history(tmp_path: Path) -> None:
    imp, hist = write_example(tmp_path)
    ds = _prep(tmp_path, imp, hist)
    assert _events(ds) == EXPECTED
    assert ds.meta["user_key"] == ds.meta["item_key"] == BLAKE2B_63
    assert ds.meta["time"]["history"] == "one unit before the earliest impression"
    assert "clicked" in ds.meta["label_rule"] and ds.meta["source"]["impressions"] == str(imp)
    assert ds.meta["counts"]["events"] == 11 and ds.meta["counts"]["positives"] == 6


def test_cli_takes_the_example(tmp_path: Path) -> None:
    imp, hist = write_example(tmp_path)
    res = CliRunner().invoke(main, ["data", "prepare", "--impressions", str(imp), "--history", str(hist),
                                    "--user-col", "user", "--time-col", "time", "--history-item-col", "item",
                                    "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "events 11" in res.output and "user ids keyed by blake2b-63" in res.output
    assert _events(load_dataset(tmp_path / "cli")) == EXPECTED
    res = CliRunner().invoke(main, ["data", "prepare", "--impressions", str(imp), "--label-col", "x", "--out",
                                    str(tmp_path / "no")])
    assert res.exit_code == 2 and "shown / clicked" in res.output
    res = CliRunner().invoke(main, ["data", "prepare", "--out", str(tmp_path / "no")])
    assert res.exit_code == 2 and "--impressions" in res.output


def test_parquet_lists_and_history_times(tmp_path: Path) -> None:
    imp = tmp_path / "imp.parquet"
    pq.write_table(pa.table({
        "uid": pa.array([11, 12, 11]), "ts": pa.array([100, 105, 200]),
        "shown": pa.array([[1, 2, 3], [2, 4], [4, 5]], pa.list_(pa.int64())),
        "clicked": pa.array([[2], [], [5, 1]], pa.list_(pa.int64()))}), imp)
    hist = tmp_path / "hist.parquet"
    pq.write_table(pa.table({"uid": [11, 11, 12], "nid": [7, 8, 1], "read_at": [50, 60, 70]}), hist)
    ds = _prep(tmp_path, imp, hist, user_col="uid", time_col="ts", history_item_col="nid", history_time_col="read_at")
    assert ds.meta["user_key"] == ds.meta["item_key"] == "int"
    rows = {r["user_id"]: list(zip(ds.item_catalogue.lookup(np.array(r["items"])).tolist(), r["timestamps"],
                                   r["labels"], strict=True)) for r in ds.histories.to_pylist()}
    assert rows == {11: [(7, 50, 1), (8, 60, 1), (1, 100, 0), (2, 100, 1), (3, 100, 0), (4, 200, 0), (5, 200, 1),
                         (1, 200, 1)],
                    12: [(1, 70, 1), (2, 105, 0), (4, 105, 0)]}
    assert ds.meta["time"]["history"] == {"column": "read_at", "input": "number"}


def test_labelled_tokens_mind_style(tmp_path: Path) -> None:
    imp = tmp_path / "behaviors.tsv"
    imp.write_text("id\tuser\ttime\thistory\timpressions\n"
                   "1\tU1\t11/11/2019 9:00:00 AM\tN7 N8\tN1-0 N2-1 N3-0\n"
                   "2\tU2\t11/11/2019 9:05:00 AM\tN1\tN2-0 N4-0\n"
                   "3\tU1\t11/12/2019 10:00:00 AM\tN7 N8\tN4-0 N5-1 N1-1\n")
    ds = _prep(tmp_path, imp, imp, shown_col="impressions", labelled_impressions=True, history_item_col="history",
               time_format="%m/%d/%Y %I:%M:%S %p")
    assert _events(ds) == EXPECTED  # the history column repeats per impression: each (user, item) read once
    imp.write_text(imp.read_text().replace("N5-1", "N5-yes"))
    with pytest.raises(DataError, match=r"'impressions'.*<item>-<0\|1>.*row 2 .*'N5-yes'"):
        _prep(tmp_path, imp, out="bad", shown_col="impressions", labelled_impressions=True,
              time_format="%m/%d/%Y %I:%M:%S %p")


def test_bad_impression_logs_name_file_and_column(tmp_path: Path) -> None:
    imp, hist = write_example(tmp_path)
    with pytest.raises(DataError, match=r"impressions file .*impressions.tsv: missing clicked column 'clicks'"):
        _prep(tmp_path, imp, out="a", clicked_col="clicks")
    with pytest.raises(DataError, match=r"history file .*history.tsv: missing item column 'news'"):
        _prep(tmp_path, imp, hist, out="b", history_item_col="news")
    bad = tmp_path / "bad.tsv"
    bad.write_text("user\ttime\tshown\tclicked\nU1\t1\t1 2 3\t2\nU2\t2\t4 -5\t\n")
    with pytest.raises(DataError, match=r"column 'shown'.*negative.*row 1 .*'-5'"):
        _prep(tmp_path, bad, out="c")
    with pytest.raises(DataError, match="give either an event log"):
        PrepareConfig(events=tmp_path / "e.csv", impressions=imp, out=tmp_path / "d")
    with pytest.raises(DataError, match="--history is the read history"):
        PrepareConfig(events=tmp_path / "e.csv", history=hist, out=tmp_path / "d")


def test_reads_stay_in_train_and_one_user_is_one_key_across_both_files(tmp_path: Path) -> None:
    """Read history far outnumbering the impressions (no history times: stamped before the first impression) stays
    in train — the global cut is placed over the impressions; in auto id mode a user all-digit in one file
    ("0042") and a file with text ids ("U9") are keyed alike: one user, not two."""
    imp, hist = tmp_path / "imp.tsv", tmp_path / "hist.tsv"
    imp.write_text("user\ttime\tshown\tclicked\n0042\t100\tN1 N2\tN2\n0043\t200\tN3\tN3\n0042\t300\tN4\tN4\n")
    reads = "".join(f"0042\tR{k}\n" for k in range(20)) + "U9\tR0\n"
    hist.write_text("user\titem\n" + reads)
    ds = _prep(tmp_path, imp, hist, shown_col="shown", clicked_col="clicked")
    counts = ds.meta["counts"]
    assert counts["users"] == 3 and counts["train"]["samples"] >= 21  # 0042, 0043, U9; every read in train
    keys = {row["user_id"] for row in ds.histories.to_pylist()}
    assert key_of("0042") in keys and key_of("42") not in keys
