"""The item catalogue (cachestore/store/catalogue.py) and `ckv data prepare` extending it day after day."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.store.catalogue import CATALOGUE_FILE, CatalogueError, ItemCatalogue, load_catalogue
from collectivekv.cachestore.store.item_ids import ItemIds, UnknownItemError, raw_to_dense
from collectivekv.jobs.cli import main
from collectivekv.pipeline.data.dataset_schema import META_FILE, DataError, load_dataset
from collectivekv.pipeline.data.prepare import PrepareConfig, previous_catalogue

raw_ids = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40)


def test_round_trip_keeps_ids_genres_and_hash(tmp_path: Path) -> None:
    cat = ItemCatalogue(np.array([50, 7, 2**62, -3]), ("Drama", "Action"))
    path = cat.save(tmp_path / CATALOGUE_FILE)
    back = load_catalogue(path, expected_sha256=cat.sha256)
    assert back.raw_items.tolist() == [50, 7, 2**62, -3] and back.genres == ("Drama", "Action")
    assert back.sha256 == cat.sha256 and load_catalogue(tmp_path).sha256 == cat.sha256  # a dir: its file
    assert cat.to_dense(np.array([[7, -3], [50, 2**62]])).tolist() == [[2, 4], [1, 3]]
    assert cat.lookup(np.array([4, 1])).tolist() == [-3, 50]
    assert cat.to_dense(np.array([8, 7]), unknown="zero").tolist() == [0, 2]
    with pytest.raises(CatalogueError, match="item 8 is not in the model's item catalogue"):
        cat.to_dense(np.array([7, 8]))
    with pytest.raises(CatalogueError, match="outside 1..4"):
        cat.lookup(np.array([0]))
    assert cat.genre_ids(["Action", "Drama"]).tolist() == [2, 1]


def test_extend_appends_new_items_and_genres_only() -> None:
    cat = ItemCatalogue(np.array([30, 10]), ("B",))
    ext = cat.extend(np.array([20, 10, 40, 20]), new_genres=["C", "A", "B"])
    assert ext.raw_items.tolist() == [30, 10, 20, 40] and ext.genres == ("B", "A", "C")
    assert cat.raw_items.tolist() == [30, 10]  # immutable
    assert ext.extend(ext.raw_items).sha256 == ext.sha256


@settings(max_examples=150, deadline=None)
@given(first=raw_ids, second=raw_ids)
def test_extend_never_changes_a_known_id(first: list[int], second: list[int]) -> None:
    cat = ItemCatalogue(np.zeros(0, np.int64)).extend(first)
    ext = cat.extend(second)
    known = cat.raw_items
    assert np.array_equal(ext.to_dense(known), cat.to_dense(known))  # known items keep their dense ids
    assert set(ext.raw_items.tolist()) == set(first) | set(second)
    assert np.array_equal(ext.lookup(np.arange(1, ext.n_items + 1)), ext.raw_items)
    ids = ext.item_ids()
    dense, ok = raw_to_dense(ids.sorted_raw, ids.dense, np.array(second, dtype=np.int64))
    assert ok.all() and np.array_equal(ext.raw_items[dense - 1], np.array(second, dtype=np.int64))


def test_hash_mismatch_and_damaged_files_are_one_clear_error(tmp_path: Path) -> None:
    cat = ItemCatalogue(np.array([5, 6, 7]))
    path = cat.save(tmp_path / CATALOGUE_FILE)
    with pytest.raises(CatalogueError, match="differs from the expected sha256"):
        load_catalogue(path, expected_sha256="0" * 64)
    table = pq.read_table(path)  # rows changed, metadata (and its hash) kept: the recorded hash catches it
    pq.write_table(table.set_column(1, "raw_item", pa.array([5, 6, 8], pa.int64())), tmp_path / "swapped.parquet")
    with pytest.raises(CatalogueError, match="swapped.parquet: content hash .* differs from its recorded sha256"):
        load_catalogue(tmp_path / "swapped.parquet")
    data = path.read_bytes()
    for name, damaged in {"truncated": data[: len(data) // 2], "garbage": b"\x00" * 64,
                          "flipped": data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]}.items():
        bad = tmp_path / f"{name}.parquet"
        bad.write_bytes(damaged)
        try:
            got = load_catalogue(bad)
        except CatalogueError as exc:
            assert str(bad) in str(exc) and "\n" not in str(exc)
        else:  # a flip that parquet does not notice must still give the same content
            assert got.sha256 == cat.sha256


def test_item_ids_name_the_first_unknown_position() -> None:
    ids = ItemIds.from_raw_items(np.array([9, 4]))
    assert ids.to_dense(np.array([4, 9, 4])).tolist() == [2, 1, 2]
    with pytest.raises(UnknownItemError) as info:
        ids.to_dense(np.array([4, 5, 6]))
    assert info.value.raw == 5 and info.value.position == 1
    assert ItemIds.identity(3).to_dense(np.array([3])).tolist() == [3]


def prepare_day(root: Path, name: str, items: list[int], *extra: str) -> Path:
    """Prepare an event log where each of 20 users rates every item of `items` once, into root/name."""
    rows = [(u, it, 4.0 if (u + it) % 3 else 2.0, 100 * k + u) for u in range(1, 21) for k, it in enumerate(items)]
    events = root / f"{name}.csv"
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(events, index=False)
    genres = root / f"{name}-movies.csv"
    pd.DataFrame({"movieId": items, "genres": [f"G{it % 4}|H" for it in items]}).to_csv(genres, index=False)
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(events), "--items", str(genres),
                                    "--out", str(root / name), *extra])
    assert res.exit_code == 0, res.output
    return root / name


def dense_of(data: Path) -> dict[int, int]:
    items = load_dataset(data).items
    return dict(zip(items["raw_item"].to_pylist(), items["item_id"].to_pylist(), strict=True))


def test_prepare_extends_the_previous_catalogue(tmp_path: Path) -> None:
    day1 = list(range(10, 60, 5))
    data1 = prepare_day(tmp_path, "day1", day1)
    ids1 = dense_of(data1)
    assert sorted(ids1) == day1 and [ids1[r] for r in day1] == list(range(1, 11))  # fresh: by raw id
    # day 2: item 10 replaced by 12 (sorts first) and 99 added
    day2 = [12, *day1[1:], 99]
    data2 = prepare_day(tmp_path, "day2", day2, "--catalogue", str(data1))
    ds = load_dataset(data2)
    ids2 = dense_of(data2)
    assert all(ids2[r] == ids1[r] for r in day1)  # every known item kept its id (10 too: still in the catalogue)
    assert ids2[12] == 11 and ids2[99] == 12 and ds.n_items == 12
    meta = json.loads((data2 / META_FILE).read_text())
    assert meta["schema_version"] == 2 and meta["catalogue"]["new_items"] == 2
    assert meta["catalogue"]["previous_sha256"] == ItemCatalogue(np.array(day1), ("G0", "G1", "G2", "G3", "H")).sha256
    samples = ds.samples["train"].to_pandas()
    assert 1 not in set(samples.item_id)  # item 10 (dense 1) has no events on day 2
    # without --catalogue, the dataset already at --out is the previous catalogue
    config = PrepareConfig(events=tmp_path / "day2.csv", out=data2)
    assert previous_catalogue(config).sha256 == ds.catalogue.sha256
    assert previous_catalogue(PrepareConfig(events=tmp_path / "day2.csv", out=data2, new_catalogue=True)) is None
    assert previous_catalogue(PrepareConfig(events=tmp_path / "day2.csv", out=tmp_path / "nothing")) is None
    # --new-catalogue: numbered afresh by raw id
    data3 = prepare_day(tmp_path, "day3", day2, "--new-catalogue")
    assert dense_of(data3)[12] == 1 and load_dataset(data3).n_items == 11


def test_old_datasets_load_and_bad_catalogue_options_are_refused(tmp_path: Path) -> None:
    old = prepare_day(tmp_path, "day1", [3, 1, 2])
    meta = json.loads((old / META_FILE).read_text())
    meta["schema_version"] = 1
    del meta["catalogue"]
    (old / META_FILE).write_text(json.dumps(meta))
    (old / CATALOGUE_FILE).unlink()
    ds = load_dataset(old)  # schema 1: loads, identity catalogue
    assert ds.catalogue is None and ds.item_catalogue.raw_items.tolist() == [1, 2, 3]
    data2 = prepare_day(tmp_path, "day2", [4, 1], "--catalogue", str(old))  # extends the ids the old one used
    assert dense_of(data2) == {1: 1, 2: 2, 3: 3, 4: 4}
    (data2 / CATALOGUE_FILE).write_bytes(b"not parquet")
    with pytest.raises(DataError, match="catalogue.parquet: unreadable item catalogue"):
        load_dataset(data2)
    events = tmp_path / "day2.csv"
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(events), "--out", str(tmp_path / "x"),
                                    "--catalogue", str(events.parent / "day2-movies.csv")])
    assert res.exit_code == 1 and "unreadable item catalogue" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(events), "--out", str(tmp_path / "x"),
                                    "--catalogue", str(old), "--new-catalogue"])
    assert res.exit_code == 1 and "not both" in res.output
    assert not (tmp_path / "x").exists()


def test_catalogue_and_item_ids_import_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, cachestore.store.catalogue, cachestore.store.item_ids; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3]).returncode == 0
