"""Tests of `ckv data prepare` (pipeline/data/events.py, prepare.py, dataset_schema.py; jobs/prepare.py).

Small fixture event logs are written into tmp_path; one test prepares the bundled MovieLens file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collectivekv.jobs.prepare import data
from collectivekv.pipeline.data.build import build_dataset, dense_rank, stable_order
from collectivekv.pipeline.data.dataset_schema import (
    SPLITS,
    CanonicalDataset,
    DataError,
    load_dataset,
    validate_dataset,
)
from collectivekv.pipeline.data.event_values import read_events
from collectivekv.pipeline.data.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[3]
MOVIELENS = REPO / "data" / "movielens"

# user, item (raw), rating, timestamp — ties in time (user 1 @ 20, user 2 @ 5) and a repeated item.
EVENTS = pd.DataFrame(
    [
        (1, 300, 5.0, 10),
        (1, 100, 3.0, 20),
        (1, 7, 4.0, 20),
        (1, 300, 1.0, 30),
        (1, 50, 4.5, 90),
        (2, 7, 2.0, 5),
        (2, 100, 4.0, 5),
        (2, 50, 5.0, 40),
        (2, 8, 3.5, 60),
        (3, 300, 4.0, 70),
        (3, 7, 0.5, 80),
        (3, 100, 4.0, 100),
        (2, 300, 4.0, 95),
        (3, 50, 2.0, 15),
        (1, 8, 5.0, 50),
    ],
    columns=["userId", "movieId", "rating", "timestamp"],
)
MOVIES = pd.DataFrame(
    {
        "movieId": [7, 8, 50, 100, 300, 999],
        "title": ["a", "b", "c", "d", "e", "unused"],
        "genres": ["Drama|Comedy", "(no genres listed)", "Comedy", "Sci-Fi|Drama", "Action", "Western"],
    }
)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def _prepare(
    tmp_path: Path,
    events: pd.DataFrame = EVENTS,
    suffix: str = ".csv",
    name: str = "out",
    **overrides: object,
) -> CanonicalDataset:
    cfg = dict(
        events=_write(events, tmp_path / f"ratings{suffix}"),
        out=tmp_path / name,
        items=_write(MOVIES, tmp_path / f"movies{suffix}"),
        rating_col="rating",
        rating_threshold=4.0,
    )
    cfg.update(overrides)
    prepare(PrepareConfig(**cfg))  # type: ignore[arg-type]
    return load_dataset(tmp_path / name)


@pytest.fixture
def ds(tmp_path: Path) -> CanonicalDataset:
    return _prepare(tmp_path)


def _histories(ds: CanonicalDataset) -> dict[int, dict[str, list[int]]]:
    return {r["user_id"]: r for r in ds.histories.to_pylist()}


def _all_samples(ds: CanonicalDataset) -> pd.DataFrame:
    return pd.concat([ds.samples[s].to_pandas().assign(split=s) for s in SPLITS], ignore_index=True)


def test_no_leakage_and_hist_len_is_strict_count(ds: CanonicalDataset) -> None:
    hist = _histories(ds)
    for s in _all_samples(ds).itertuples():
        ts = hist[s.user_id]["timestamps"]
        assert all(t < s.timestamp for t in ts[: s.hist_len])
        assert s.hist_len == sum(t < s.timestamp for t in ts)
    tied = _all_samples(ds).query("user_id == 1 and timestamp == 20")
    assert list(tied.hist_len) == [1, 1]  # both tied events see only the event at t=10


def test_splits_disjoint_in_time(ds: CanonicalDataset) -> None:
    tr, va, te = (ds.samples[s].to_pandas().timestamp for s in SPLITS)
    vs, ts = ds.meta["splits"]["valid_start"], ds.meta["splits"]["test_start"]
    assert tr.max() < vs <= va.min() and va.max() < ts <= te.min()
    assert len(tr) + len(va) + len(te) == len(EVENTS)
    assert ds.meta["split_fractions"] == [0.8, 0.1, 0.1]
    # 15 events: valid_start = sorted_ts[12], test_start = sorted_ts[13]
    assert (vs, ts) == tuple(np.sort(EVENTS.timestamp)[[12, 13]])
    for split in SPLITS:
        frame = ds.samples[split].to_pandas()
        assert frame.equals(frame.sort_values(["timestamp", "user_id", "item_id"], kind="stable"))


def test_item_ids_dense_and_round_trip(ds: CanonicalDataset) -> None:
    items = ds.items.to_pandas()
    assert list(items.item_id) == list(range(1, ds.n_items + 1))
    assert list(items.raw_item) == sorted(EVENTS.movieId.unique())  # 999 (no events) dropped
    to_raw = dict(zip(items.item_id, items.raw_item, strict=True))
    got = _all_samples(ds).assign(raw=lambda f: f.item_id.map(to_raw))
    key = ["user_id", "raw", "timestamp", "label"]
    expected = EVENTS.assign(label=(EVENTS.rating >= 4).astype(int)).rename(
        columns={"userId": "user_id", "movieId": "raw"}
    )[key]
    assert sorted(map(tuple, got[key].to_numpy().tolist())) == sorted(map(tuple, expected.to_numpy().tolist()))
    assert 0 not in set(got.item_id)


def test_genre_ids_dense(ds: CanonicalDataset) -> None:
    assert ds.genres == ["Action", "Comedy", "Drama", "Sci-Fi"]  # Western only on an unused item
    by_raw = {r["raw_item"]: [ds.genres[g - 1] for g in r["genre_ids"]] for r in ds.items.to_pylist()}
    assert by_raw == {
        7: ["Comedy", "Drama"],
        8: [],
        50: ["Comedy"],
        100: ["Drama", "Sci-Fi"],
        300: ["Action"],
    }
    used = {g for r in ds.items.to_pylist() for g in r["genre_ids"]}
    assert used == set(range(1, ds.n_genres + 1))
    assert ds.meta["counts"]["items_without_genres"] == 1


def test_histories_time_ordered_and_stable(ds: CanonicalDataset) -> None:
    hist = _histories(ds)
    assert list(hist) == [1, 2, 3] == sorted(hist)
    to_raw = dict(zip(ds.items.to_pandas().item_id, ds.items.to_pandas().raw_item, strict=True))
    for user, row in hist.items():
        assert row["timestamps"] == sorted(row["timestamps"])
        mine = EVENTS[EVENTS.userId == user].sort_values("timestamp", kind="stable")
        assert [to_raw[i] for i in row["items"]] == list(mine.movieId)
        assert row["labels"] == list((mine.rating >= 4).astype(int))
    assert [to_raw[i] for i in hist[1]["items"][1:3]] == [100, 7]  # tie at t=20 keeps file order


def test_label_rule_and_label_column(tmp_path: Path) -> None:
    ds = _prepare(tmp_path, rating_threshold=3.5)
    assert ds.meta["counts"]["positives"] == int((EVENTS.rating >= 3.5).sum())
    assert "3.5" in ds.meta["label_rule"]
    clicks = EVENTS.assign(click=(EVENTS.rating >= 4.5).astype(int)).drop(columns="rating")
    ds2 = _prepare(tmp_path, clicks, name="out2", label_col="click", rating_col=None, rating_threshold=None)
    assert ds2.meta["counts"]["positives"] == int(clicks.click.sum()) == 4 and "click" in ds2.meta["label_rule"]


def test_csv_and_parquet_give_identical_outputs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _prepare(tmp_path / "a"), _prepare(tmp_path / "b", suffix=".parquet")
    assert {k: v for k, v in a.meta.items() if k != "source"} == {k: v for k, v in b.meta.items() if k != "source"}
    assert a.items.equals(b.items) and a.histories.equals(b.histories)
    assert all(a.samples[s].equals(b.samples[s]) for s in SPLITS)


def test_output_types_exact_and_validator_catches_leak(ds: CanonicalDataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        str(pq.read_schema(out / "samples" / "train.parquet").types) == "[DataType(int64), DataType(int32), "
        "DataType(int8), DataType(int64), DataType(int32)]"
    )
    assert str(pq.read_schema(out / "histories.parquet").field("labels").type.value_type) == "int8"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["items"].endswith("movies.csv") and len(meta["source"]["sha256"]) == 64
    train = ds.samples["train"]
    bad = train.set_column(4, "hist_len", pa.array(train["hist_len"].to_numpy() + 1, pa.int32()))
    with pytest.raises(DataError, match="leak|hist_len"):
        validate_dataset(CanonicalDataset(ds.meta, ds.items, ds.histories, {**ds.samples, "train": bad}))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(0, 5), st.integers(0, 1)),
        min_size=1,
        max_size=40,
    )
)
def test_hist_len_matches_brute_force(rows: list[tuple[int, int, int, int]]) -> None:
    events = pd.DataFrame(rows, columns=["user", "item", "timestamp", "label"]).astype(
        {"user": "int64", "item": "int64", "timestamp": "int64", "label": "int8"}
    )
    ds = build_dataset(events)
    validate_dataset(ds)
    got = _all_samples(ds)
    for s in got.itertuples():
        assert s.hist_len == int(((events.user == s.user_id) & (events.timestamp < s.timestamp)).sum())


@settings(max_examples=40, deadline=None)
@example([(0, -(2**63), 0), (1, 2**63 - 1, 1)])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-(2**63), 2**63 - 1), st.integers(-5, 5)), min_size=1))
def test_stable_order_and_dense_rank_match_numpy(rows: list[tuple[int, int, int]]) -> None:
    a, b, c = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    assert np.array_equal(stable_order(a, b, c), np.lexsort((c, b, a)))
    assert np.array_equal(stable_order(c, a), np.lexsort((a, c)))
    for values in (b, c):
        uniques, codes = np.unique(values, return_inverse=True)
        got_codes, got_uniques = dense_rank(values)
        assert np.array_equal(got_codes, codes.reshape(-1)) and np.array_equal(got_uniques, uniques)


# ---- bad input ------------------------------------------------------------------------------------------


def _bad(frame_or_text: pd.DataFrame | str, tmp_path: Path, **overrides: object) -> str:
    path = tmp_path / "bad.csv"
    if isinstance(frame_or_text, str):
        path.write_text(frame_or_text)
    else:
        frame_or_text.to_csv(path, index=False)
    cfg = dict(events=path, out=tmp_path / "out", rating_col="rating", rating_threshold=4.0)
    cfg.update(overrides)
    with pytest.raises(DataError) as err:
        prepare(PrepareConfig(**cfg))  # type: ignore[arg-type]
    assert str(path) in str(err.value)
    assert not (tmp_path / "out").exists()
    return str(err.value)


def test_missing_column_lists_found(tmp_path: Path) -> None:
    msg = _bad(EVENTS.rename(columns={"userId": "user"}), tmp_path)
    assert "'userId'" in msg and "columns found" in msg and "'user'" in msg


@pytest.mark.parametrize(
    ("column", "value", "expect"),
    [
        ("userId", "abc", "non-numeric"),
        ("movieId", "x7", "non-numeric"),
        ("timestamp", "2020-01-01", "non-numeric"),
        ("rating", "good", "non-numeric"),
        ("userId", 1.5, "non-integer"),
        ("timestamp", None, "1 null value(s), first at row 3"),
        ("movieId", None, "1 null value(s), first at row 3"),
    ],
)
def test_bad_values(tmp_path: Path, column: str, value: object, expect: str) -> None:
    frame = EVENTS.astype(object)
    frame.loc[3, column] = value
    msg = _bad(frame, tmp_path, user_ids="int", item_ids="int")  # text ids: test_event_formats.py
    assert f"'{column}'" in msg and expect in msg


def test_label_outside_01(tmp_path: Path) -> None:
    frame = EVENTS.assign(click=[1, 0, 2] + [0] * 12)
    msg = _bad(frame, tmp_path, label_col="click", rating_col=None, rating_threshold=None)
    assert "'click'" in msg and "0 or 1" in msg and "row 2" in msg


def test_empty_files(tmp_path: Path) -> None:
    assert "0 bytes" in _bad("", tmp_path)
    assert "no rows" in _bad("userId,movieId,rating,timestamp\n", tmp_path)


def test_both_or_neither_label_and_rating(tmp_path: Path) -> None:
    assert "got both" in _bad(EVENTS.assign(click=1), tmp_path, label_col="click")
    assert "got neither" in _bad(EVENTS, tmp_path, rating_col=None, rating_threshold=None)


def test_bad_items_file(tmp_path: Path) -> None:
    events = _write(EVENTS, tmp_path / "ratings.csv")
    items = _write(MOVIES.rename(columns={"genres": "genre"}), tmp_path / "movies.csv")
    with pytest.raises(DataError, match=r"items file .*movies\.csv.*'genres'.*columns found"):
        prepare(PrepareConfig(events=events, out=tmp_path / "o", items=items, rating_col="rating", rating_threshold=4))


def test_duplicate_item_in_items_file(tmp_path: Path) -> None:
    events = _write(EVENTS, tmp_path / "ratings.csv")
    items = _write(pd.concat([MOVIES, MOVIES.iloc[[2]]]), tmp_path / "movies.csv")
    with pytest.raises(DataError, match=r"movies\.csv: column 'movieId' .*1 duplicate id\(s\).*row 6"):
        prepare(PrepareConfig(events=events, out=tmp_path / "o", items=items, rating_col="rating", rating_threshold=4))


def test_failure_keeps_existing_output(tmp_path: Path) -> None:
    _prepare(tmp_path)
    before = (tmp_path / "out" / "meta.json").read_text()
    with pytest.raises(DataError):
        _prepare(tmp_path, EVENTS.drop(columns="timestamp"), overwrite=True)
    assert (tmp_path / "out" / "meta.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_read_events_parquet_datetime(tmp_path: Path) -> None:
    frame = EVENTS.assign(timestamp=pd.to_datetime(EVENTS.timestamp, unit="s"))
    got = read_events(
        _write(frame, tmp_path / "e.parquet"),
        user_col="userId",
        item_col="movieId",
        time_col="timestamp",
        rating_col="rating",
        rating_threshold=4.0,
    )
    assert list(got.timestamp) == list(EVENTS.timestamp)


# ---- CLI + bundled data ---------------------------------------------------------------------------------


def test_cli_errors_exit_nonzero(tmp_path: Path) -> None:
    runner = CliRunner()
    path = _write(EVENTS.rename(columns={"movieId": "item"}), tmp_path / "r.csv")
    res = runner.invoke(data, ["prepare", "--events", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and str(path) in res.output and "'movieId'" in res.output
    empty = tmp_path / "e.csv"
    empty.write_text("")
    res = runner.invoke(data, ["prepare", "--events", str(empty), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "0 bytes" in res.output
    res = runner.invoke(
        data,
        [
            "prepare",
            "--events",
            str(path),
            "--out",
            str(tmp_path / "o"),
            "--label-col",
            "rating",
            "--rating-col",
            "rating",
        ],
    )
    assert res.exit_code != 0 and "not both" in res.output
    frame = EVENTS.assign(click=7)
    res = runner.invoke(
        data,
        [
            "prepare",
            "--events",
            str(_write(frame, tmp_path / "c.csv")),
            "--out",
            str(tmp_path / "o"),
            "--label-col",
            "click",
        ],
    )
    assert res.exit_code == 1 and "'click'" in res.output and not (tmp_path / "o").exists()


def test_movielens_prepares(tmp_path: Path) -> None:
    out = tmp_path / "ml"
    res = CliRunner().invoke(
        data,
        [
            "prepare",
            "--events",
            str(MOVIELENS / "ratings.csv"),
            "--items",
            str(MOVIELENS / "movies.csv"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "users 671" in res.output
    ds = load_dataset(out)  # validates every invariant
    assert ds.n_users == 671 and ds.histories.num_rows == 671
    assert sum(ds.samples[s].num_rows for s in SPLITS) == 100_004
    ratings = pd.read_csv(MOVIELENS / "ratings.csv")
    assert ds.n_items == ratings.movieId.nunique()
    assert ds.meta["counts"]["positives"] == int((ratings.rating >= 4).sum())
    assert ds.n_genres == len(ds.genres) > 0
