"""Ids are validated at the edge: `ckv data prepare` refuses any user / item id that does not fit in
0..2**63-1 exactly (negative, >= 2**63, fractional, a float above 2**53, a boolean), naming the file,
the column and the row; nothing wraps (a uint64 id never becomes a negative int64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collectivekv.jobs.cli import main
from collectivekv.pipeline.data.dataset_schema import DataError
from collectivekv.pipeline.data.events import to_id

GOOD = {"userId": [1, 2, 3, 4], "movieId": [10, 11, 12, 13], "rating": [4.0, 3.0, 5.0, 1.0],
        "timestamp": [1, 2, 3, 4]}


def _prepare(path: Path, tmp_path: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(path), "--out", str(tmp_path / "out")])
    return res.exit_code, res.output


def _csv(tmp_path: Path, column: str, value: str) -> Path:
    lines = ["userId,movieId,rating,timestamp"]
    for r in range(4):
        row = {k: str(v[r]) for k, v in GOOD.items()}
        if r == 2:
            row[column] = value
        lines.append(",".join(row[k] for k in GOOD))
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("column", "value", "expect"),
    [
        ("userId", "9223372036854775808", "at or above 2**63"),  # 2**63: a uint64 column
        ("userId", "18446744073709551615", "at or above 2**63"),  # 2**64 - 1
        ("userId", "99999999999999999999999", "at or above 2**63"),  # beyond uint64: text
        ("userId", "-5", "negative"),
        ("movieId", "-1", "negative"),
        ("userId", "2.5", "non-integer"),
        ("movieId", "12.25", "non-integer"),
        ("userId", "9007199254740994.0", "above 2**53"),  # a float cannot hold such an id exactly
        ("userId", "True", "boolean"),
        ("movieId", "False", "boolean"),
    ],
)
def test_bad_ids_in_csv_are_refused_with_the_row(tmp_path: Path, column: str, value: str, expect: str) -> None:
    path = _csv(tmp_path, column, value)
    code, out = _prepare(path, tmp_path)
    assert code == 1, out
    assert str(path) in out and f"column '{column}'" in out and expect in out and "row 2" in out, out
    assert out.count("\n") == 1 and "Traceback" not in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("array", "expect"),
    [
        (pa.array([1, 2, 2**63 + 7, 4], pa.uint64()), "at or above 2**63"),
        (pa.array([1, 2, -3, 4], pa.int64()), "negative"),
        (pa.array([1.0, 2.0, 0.5, 4.0], pa.float64()), "non-integer"),
        (pa.array([1.0, 2.0, 2.0**60, 4.0], pa.float64()), "above 2**53"),
        (pa.array([True, False, True, False]), "boolean"),
    ],
)
def test_bad_ids_in_parquet_are_refused(tmp_path: Path, array: pa.Array, expect: str) -> None:
    table = pa.table({**{k: v for k, v in GOOD.items() if k != "userId"}, "userId": array})
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    code, out = _prepare(path, tmp_path)
    assert code == 1 and "column 'userId'" in out and expect in out and "row" in out, out


def test_largest_ids_keep_their_value(tmp_path: Path) -> None:
    frame = pd.DataFrame(GOOD)
    frame.loc[2, "userId"] = 2**63 - 1
    frame.loc[1, "movieId"] = 0
    path = tmp_path / "events.csv"
    frame.to_csv(path, index=False)
    code, out = _prepare(path, tmp_path)
    assert code == 0, out
    users = pq.read_table(tmp_path / "out" / "histories.parquet").column("user_id").to_pylist()
    assert sorted(users) == [1, 2, 4, 2**63 - 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-(2**70), 2**70), st.booleans(),
                          st.floats(allow_nan=True, allow_infinity=True)), min_size=1, max_size=8))
@example([0, 9007199254740994.0])  # pandas turns this column into int64: the float must still be refused
def test_to_id_accepts_exactly_the_ids_that_fit(values: list) -> None:
    """Any mix of Python ints, bools and floats (an object column): accepted iff every value is an exact
    integer in 0..2**63-1 (floats only up to 2**53), and then returned unchanged."""
    series = pd.Series(values, dtype=object)
    fits = all(not isinstance(v, bool) and (
        (isinstance(v, int) and 0 <= v < 2**63) or (isinstance(v, float) and v.is_integer() and 0 <= v <= 2**53))
        for v in values)
    if fits:
        assert to_id(series, "w").tolist() == [int(v) for v in values]
        assert to_id(series, "w").dtype == np.int64
    else:
        with pytest.raises(DataError, match="row"):
            to_id(series, "w")
