"""Tests of `ckv data import --format fuxictr` (pipeline/data/fuxictr_import.py, the "sequence" history and
"source" split rules of pipeline/data/dataset_schema.py, jobs/prepare.py) on the FuxiCTR tiny sequence fixture
(tests/fixtures/fuxictr_tiny_seq, LongCTR's layout)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collectivekv.jobs.cli import main
from collectivekv.pipeline.data.dataset_schema import SPLITS, DataError, load_dataset, validate_dataset
from collectivekv.pipeline.data.fuxictr_import import FuxiCTRImportConfig, import_fuxictr
from collectivekv.pipeline.store.safe_output import OutputError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "fuxictr_tiny_seq"
TABLES = (*SPLITS, "user_info", "item_info")


def read_source(src: Path) -> dict[str, pd.DataFrame]:
    return {name: pq.read_table(src / f"{name}.parquet").to_pandas() for name in TABLES}


def write_source(tables: dict[str, pd.DataFrame], dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), dst / f"{name}.parquet")
    return dst


def imported(src: Path, out: Path, **options: object) -> tuple[dict, object]:
    meta = import_fuxictr(FuxiCTRImportConfig(source=src, out=out, **options))  # type: ignore[arg-type]
    return meta, load_dataset(out)  # load_dataset validates


def expected_rows(src: Path) -> list[tuple]:
    """(split, user, item, label, visible history) per source row, straight from LongCTR's rule: the
    non-zero items of full_item_seq[:seq_len]."""
    tables = read_source(src)
    seqs = tables["user_info"]["full_item_seq"].tolist()
    rows = []
    for split in SPLITS:
        for r in tables[split].itertuples(index=False):
            visible = tuple(int(x) for x in list(seqs[r.user_index])[: r.seq_len] if x != 0)
            rows.append((split, int(r.user_index), int(r.item_index), int(r.is_click), visible))
    return sorted(rows)


def canonical_rows(ds: object) -> list[tuple]:
    """The same tuples from a canonical dataset: each sample's history is items[:hist_len] of its user."""
    hist = {int(u): list(items) for u, items in zip(ds.histories["user_id"].to_pylist(),  # type: ignore[attr-defined]
                                                    ds.histories["items"].to_pylist(), strict=True)}  # type: ignore[attr-defined]
    rows = []
    for split in SPLITS:
        t = ds.samples[split].to_pandas()  # type: ignore[attr-defined]
        for r in t.itertuples(index=False):
            seen = tuple(hist[int(r.user_id)][: r.hist_len])
            rows.append((split, int(r.user_id), int(r.item_id), int(r.label), seen))
    return sorted(rows)


def test_fixture_imports_validates_and_round_trips(tmp_path: Path) -> None:
    meta, ds = imported(FIXTURE, tmp_path / "data")
    src = read_source(FIXTURE)
    assert meta["splits"]["kind"] == "source" and meta["history"]["kind"] == "sequence"
    assert meta["label_rule"] == "label = column 'is_click' (0/1)"
    assert meta["time"]["input"] == "synthesised"
    for split in SPLITS:  # the source's split kept, row for row
        assert ds.samples[split].num_rows == len(src[split]) == meta["counts"][split]["samples"]
        assert meta["counts"][split]["positives"] == int(src[split]["is_click"].sum())
    assert canonical_rows(ds) == expected_rows(FIXTURE)
    # histories: every user with a sample or a behaviour, the sequence in order, labels 1, times 0, 1, 2, ...
    seqs = src["user_info"]["full_item_seq"].tolist()
    users = sorted(set(np.concatenate([src[s]["user_index"].to_numpy() for s in SPLITS]).tolist())
                   | {u for u, s in enumerate(seqs) if len(s)})
    assert ds.histories["user_id"].to_pylist() == users
    for u, items, ts, labels in zip(*(ds.histories[c].to_pylist() for c in ("user_id", "items", "timestamps",
                                                                             "labels")), strict=True):
        assert items == [int(x) for x in seqs[u]] and ts == list(range(len(items))) and labels == [1] * len(items)
    assert meta["counts"]["behaviours"] == sum(len(s) for s in seqs)
    # items: dense id = item_index, genres = cate_id (0 = none)
    info = src["item_info"]
    assert ds.n_items == len(info) - 1 and ds.items["raw_item"].to_pylist() == list(range(1, len(info)))
    names = [[ds.genres[g - 1] for g in gids] for gids in ds.items["genre_ids"].to_pylist()]
    assert names == [[] if c == 0 else [str(c)] for c in info["cate_id"].tolist()[1:]]


def test_padding_anywhere_is_dropped_as_longctr_masks_it(tmp_path: Path) -> None:
    """Zeros before, inside and after a sequence (seq_len counting them) give the same dataset."""
    src = read_source(FIXTURE)
    padded = {k: v.copy() for k, v in src.items()}
    padded["user_info"]["full_item_seq"] = [[0, 0, *s[:1], 0, *s[1:], 0, 0, 0]
                                            for s in src["user_info"]["full_item_seq"]]
    for split in SPLITS:  # two leading zeros, and the inner zero once the prefix passes the first item
        n = padded[split]["seq_len"]
        padded[split]["seq_len"] = np.where(n == 0, 0, n + 2 + (n > 1))
    _, plain = imported(FIXTURE, tmp_path / "plain")
    _, ds = imported(write_source(padded, tmp_path / "padded_src"), tmp_path / "padded")
    assert ds.histories.equals(plain.histories)
    assert all(ds.samples[s].equals(plain.samples[s]) for s in SPLITS)
    assert canonical_rows(ds) == expected_rows(tmp_path / "padded_src")


def test_csv_source_gives_the_same_dataset(tmp_path: Path) -> None:
    src = read_source(FIXTURE)
    csv_dir = tmp_path / "csv_src"
    csv_dir.mkdir()
    for name, frame in src.items():
        if name == "user_info":
            frame = frame.assign(full_item_seq=["^".join(str(x) for x in s) for s in frame["full_item_seq"]])
        frame.to_csv(csv_dir / f"{name}.csv", index=False)
    _, plain = imported(FIXTURE, tmp_path / "plain")
    meta, ds = imported(csv_dir, tmp_path / "from_csv")
    assert meta["source"]["files"]["user_info"].endswith("user_info.csv")
    assert ds.histories.equals(plain.histories) and ds.items.equals(plain.items)
    assert all(ds.samples[s].equals(plain.samples[s]) for s in SPLITS)


def _break(tables: dict[str, pd.DataFrame], what: str) -> None:
    if what == "missing column":
        tables["valid"] = tables["valid"].drop(columns=["seq_len"])
    elif what == "seq index out of range":
        tables["user_info"].at[2, "full_item_seq"] = [78, 999]
    elif what == "seq_len beyond the sequence":
        tables["test"].loc[3, "seq_len"] = 40
    elif what == "labels not 0/1":
        tables["train"].loc[5, "is_click"] = 2.0
    elif what == "user missing from user_info":
        tables["valid"].loc[7, "user_index"] = 99
    elif what == "item out of range":
        tables["train"].loc[1, "item_index"] = 0
    elif what == "item_info not by position":
        tables["item_info"] = tables["item_info"].iloc[::-1]


@pytest.mark.parametrize("what, file, needles", [
    ("missing column", "valid.parquet", ["column 'seq_len'", "columns found"]),
    ("seq index out of range", "user_info.parquet", ["column 'full_item_seq'", "row 2", "999"]),
    ("seq_len beyond the sequence", "test.parquet", ["column 'seq_len'", "row 3", "seq_len 40"]),
    ("labels not 0/1", "train.parquet", ["column 'is_click'", "0 or 1", "row 5"]),
    ("user missing from user_info", "valid.parquet", ["column 'user_index'", "missing from user_info", "row 7"]),
    ("item out of range", "train.parquet", ["column 'item_index'", "0 is padding", "row 1"]),
    ("item_info not by position", "item_info.parquet", ["column 'item_index'", "row position"]),
])
def test_bad_input_names_file_and_column(tmp_path: Path, what: str, file: str, needles: list[str]) -> None:
    tables = read_source(FIXTURE)
    _break(tables, what)
    src = write_source(tables, tmp_path / "src")
    with pytest.raises(DataError) as err:
        import_fuxictr(FuxiCTRImportConfig(source=src, out=tmp_path / "out"))
    message = str(err.value)
    assert str(src / file) in message, message
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "out").exists()  # nothing written


def test_label_column_and_output_rules(tmp_path: Path) -> None:
    tables = read_source(FIXTURE)
    for split in SPLITS:
        tables[split] = tables[split].rename(columns={"is_click": "y"})
    src = write_source(tables, tmp_path / "src")
    with pytest.raises(DataError, match=r"train file .*train\.parquet: no label column .*--label-col"):
        import_fuxictr(FuxiCTRImportConfig(source=src, out=tmp_path / "out"))
    meta, _ = imported(src, tmp_path / "out", label_col="y", item_feature_col=None)
    assert meta["label_rule"] == "label = column 'y' (0/1)" and meta["n_genres"] == 0
    with pytest.raises(OutputError, match="--overwrite"):  # `ckv data prepare`'s --out rules
        import_fuxictr(FuxiCTRImportConfig(source=src, out=tmp_path / "out", label_col="y"))
    imported(src, tmp_path / "out", label_col="y", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="notes.txt"):
        import_fuxictr(FuxiCTRImportConfig(source=src, out=tmp_path / "other", label_col="y"))
    with pytest.raises(OutputError, match="input"):
        import_fuxictr(FuxiCTRImportConfig(source=src, out=src, label_col="y"))


def test_validator_keeps_the_event_rules_for_event_histories(tmp_path: Path) -> None:
    """The "sequence" history and "source" split relax only what they must; other kinds are refused."""
    _, ds = imported(FIXTURE, tmp_path / "data")
    as_events = replace(ds, meta={**ds.meta, "history": {"kind": "events"}})
    with pytest.raises(DataError, match="hist_len out of range|number of samples"):
        validate_dataset(as_events)
    for key, bad, message in (("history", {"kind": "tree"}, "unknown history kind 'tree'"),
                              ("splits", {"kind": "random"}, "unknown split kind 'random'")):
        with pytest.raises(DataError, match=message):
            validate_dataset(replace(ds, meta={**ds.meta, key: bad}))
    test = ds.samples["test"]  # a sample that sees a behaviour at its own time leaks
    lengths = np.diff(ds.histories["items"].combine_chunks().offsets)
    room = test["hist_len"].to_numpy() < lengths[np.searchsorted(ds.histories["user_id"].to_numpy(),
                                                                 test["user_id"].to_numpy())]
    assert room.any()
    longer = int(np.argmax(room))
    hist_len = test["hist_len"].to_numpy().copy()
    hist_len[longer] += 1
    leaky = test.set_column(4, "hist_len", pa.array(hist_len, pa.int32()))
    with pytest.raises(DataError, match="history leaks"):
        validate_dataset(replace(ds, samples={**ds.samples, "test": leaky}))


def test_cli_import_then_train_and_eval_unchanged(tmp_path: Path) -> None:
    """`ckv data import`, then `ckv train` (1 epoch, tiny dims, CPU) and `ckv eval --quick` on the result."""
    runner, data = CliRunner(), tmp_path / "data"
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    res = runner.invoke(main, ["data", "import", "--format", "fuxictr", "--source", str(src), "--out", str(data)])
    assert res.exit_code == 0, res.output
    assert "split as the source's files" in res.output and "users 24" in res.output
    res = runner.invoke(main, ["train", "--data", str(data), "--epochs", "1", "--embed-dim", "8", "--d-attn", "16",
                               "--heads", "2", "--pool-size", "16", "--max-len", "5", "--long-len", "10",
                               "--batch-size", "64", "--no-progress", "--out", str(tmp_path / "ckpt")])
    assert res.exit_code == 0, res.output
    test = json.loads(res.output[res.output.index("{"):])["test"]
    assert 0.0 <= test["gauc"] <= 1.0 and 0.0 <= test["auc"] <= 1.0
    res = runner.invoke(main, ["eval", "--data", str(data), "--quick", "--models", "din", "--sections", "table1",
                               "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert "Split: the source's own train / valid / test files" in res.output
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["sections"]["table1"]
    assert {r["kv_mode"] for r in rows} == {"full", "collective"}
    assert all(0.0 <= r["gauc"]["mean"] <= 1.0 for r in rows)
    res = runner.invoke(main, ["data", "import", "--format", "fuxictr", "--source", str(src), "--out", str(data),
                               "--overwrite", "--label-col", "nope"])
    assert res.exit_code == 1 and "column 'nope'" in res.output and str(src / "train.parquet") in res.output
    assert load_dataset(data).meta["label_rule"] == "label = column 'is_click' (0/1)"  # left as it was
