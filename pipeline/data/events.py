"""Reading and validating the user-brought input: the event log and the item side-feature file.

Input layouts (docs/data_schema.md); the format follows the extension or --sep
(pipeline/data/event_formats.py); column names are configurable, other columns are ignored:

    events  one row per interaction: <user> id, <item> id, <time> (a number, ISO-8601 text or a
            Parquet temporal column: pipeline/data/event_values.py), and either <label> in {0, 1} or a
            numeric <rating> (label = rating >= threshold).
    items   one row per item: <item> id, <feature> multi-valued text with values separated by
            '|'; empty, null or "(no genres listed)" means none.

The value checks live here (integer ids, numbers, labels); text ids, times, genre placeholders and
the readers built on them (`read_events`, `read_event_log`, `read_genres`) in
pipeline/data/event_values.py. Every problem raises DataError naming the file and the column.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from collectivekv.pipeline.data.dataset_schema import DataError
from collectivekv.pipeline.data.event_formats import first_bad, read_frame, reject_lists

NO_GENRES = "(no genres listed)"
ID_MAX = 2**63 - 1  # ids are stored as int64 (and as unsigned LMDB keys): 0..ID_MAX
FLOAT_EXACT_MAX = 2**53  # a float64 holds every integer up to here exactly


def read_columns(path: str | Path, columns: Mapping[str, str], role: str, *, sep: str | None = None,
                 text: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read the named columns of a text/Parquet file; `columns` maps meaning -> column name.

    Returns a DataFrame whose columns are the meanings (e.g. "user"), in file row order
    (pipeline/data/event_formats.py: `read_frame`).
    """
    return read_frame(path, columns, role, sep=sep, text=text)


def _where(path: str | Path, role: str, column: str, meaning: str) -> str:
    return f"{role} file {path}: column '{column}' ({meaning})"


def _first(mask: np.ndarray, values: pd.Series) -> str:
    return first_bad(mask, values)  # a short preview of the value, never a whole list


def check_no_nulls(values: pd.Series, where: str) -> None:
    """Raise DataError if `values` has nulls, saying how many and the first row."""
    nulls = values.isna().to_numpy()
    if nulls.any():
        row = int(np.flatnonzero(nulls)[0])
        raise DataError(f"{where}: {int(nulls.sum())} null value(s), first at row {row} (0-based, header excluded)")


def to_numeric(values: pd.Series, where: str) -> pd.Series:
    """Nulls, lists and non-numeric text are errors; returns a numeric Series."""
    reject_lists(values, where, "a number")
    check_no_nulls(values, where)
    if pd.api.types.is_bool_dtype(values):
        return values.astype(np.int8)
    if pd.api.types.is_numeric_dtype(values):
        return values
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy()
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} non-numeric value(s), {_first(bad, values)}")
    return numeric


def to_int64(values: pd.Series, where: str) -> np.ndarray:
    """Integer ids / timestamps: numeric, integral, within int64; returns an int64 array."""
    if pd.api.types.is_datetime64_any_dtype(values):
        check_no_nulls(values, where)
        stamps = pd.to_datetime(values, utc=True)
        return ((stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    flags = values.map(lambda v: isinstance(v, bool | np.bool_)).to_numpy(bool) if values.dtype == object else \
        np.full(len(values), pd.api.types.is_bool_dtype(values))
    if flags.any():  # True is no id and no time (it would read as 1)
        raise DataError(f"{where}: {int(flags.sum())} boolean value(s), {_first(flags, values)}; expected integers")
    numeric = to_numeric(values, where)
    if pd.api.types.is_integer_dtype(numeric):
        if pd.api.types.is_unsigned_integer_dtype(numeric):  # a uint64 at or above 2^63 would wrap negative
            big = (numeric > np.iinfo(np.int64).max).to_numpy(bool)
            if big.any():
                raise DataError(f"{where}: {int(big.sum())} value(s) at or above 2**63, {_first(big, values)}")
        return numeric.to_numpy(np.int64)
    floats = numeric.to_numpy(np.float64)
    bad = (np.mod(floats, 1.0) != 0) | ~np.isfinite(floats) | (np.abs(floats) >= 2.0**63)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} non-integer value(s), {_first(bad, values)}")
    return floats.astype(np.int64)


def _exact_ints(values: pd.Series) -> np.ndarray | None:
    """An object column of integer text, ints or exact integral floats -> object array of Python ints;
    None if any value is not one of those (the caller then reports it)."""
    def parse(v: object) -> int | None:
        if isinstance(v, bool | np.bool_):
            return None
        if isinstance(v, int | np.integer):
            return int(v)
        if isinstance(v, float | np.floating):
            return int(v) if float(v).is_integer() and abs(v) <= FLOAT_EXACT_MAX else None
        text = str(v).strip()
        digits = text.lstrip("+-")
        return int(text) if digits.isascii() and digits.isdigit() else None  # not '²' nor Arabic-Indic digits

    parsed = values.map(parse)
    return None if parsed.isna().any() else parsed.to_numpy(object)


def _is_bool_like(values: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(values):
        return np.ones(len(values), dtype=bool)
    if values.dtype != object:
        return np.zeros(len(values), dtype=bool)
    return values.map(lambda v: isinstance(v, bool | np.bool_) or str(v).strip().lower() in ("true", "false")
                      ).to_numpy(bool)


def to_id(values: pd.Series, where: str) -> np.ndarray:
    """User / item ids -> int64 array; every id must be an integer in 0..2**63-1 and nothing wraps.

    Refused with the count and the first row: nulls, booleans, non-numeric text, fractions, NaN/inf,
    negative ids, ids >= 2**63 (a uint64 column or long text), and floating-point ids above 2**53
    (a float64 cannot hold them exactly: write the ids as integers).
    """
    reject_lists(values, where, "one id")
    check_no_nulls(values, where)
    bools = _is_bool_like(values)
    if bools.any():
        raise DataError(f"{where}: {int(bools.sum())} boolean value(s) where an integer id is expected, "
                        f"{_first(bools, values)}")
    exact = _exact_ints(values) if values.dtype == object else None
    ints = exact if exact is not None else to_numeric(values, where).to_numpy()
    # an object column that is not all exact integers is judged as floats: pandas may turn integral floats
    # above 2**53 into int64 (already rounded), so its dtype says nothing about exactness
    if exact is not None or (values.dtype != object and pd.api.types.is_integer_dtype(ints.dtype)):
        checks = [(ints < 0, "negative id(s)"), (ints > ID_MAX, "id(s) at or above 2**63")]
    else:
        ints = ints.astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf % 1 is nan: the isfinite test names those values
            fraction = np.mod(ints, 1.0)
        checks = [((fraction != 0) | ~np.isfinite(ints), "non-integer value(s)"),
                  (ints < 0, "negative id(s)"),
                  (ints > FLOAT_EXACT_MAX, "floating-point id(s) above 2**53 (not exact: write ids as integers)")]
    for bad, what in checks:
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            raise DataError(f"{where}: {int(bad.sum())} {what}, {_first(bad, values)}; "
                            "ids must be integers in 0..2**63-1")
    return ints.astype(np.int64)


def label_from_column(values: pd.Series, where: str) -> np.ndarray:
    """A 0/1 label column -> int8 array; any other value is an error."""
    numeric = to_numeric(values, where).to_numpy(np.float64)
    bad = (numeric != 0) & (numeric != 1)
    if bad.any():
        raise DataError(f"{where}: label must be 0 or 1; {int(bad.sum())} other value(s), {_first(bad, values)}")
    return numeric.astype(np.int8)


def label_from_rating(values: pd.Series, threshold: float, where: str) -> np.ndarray:
    """label = rating >= threshold, as int8."""
    numeric = to_numeric(values, where).to_numpy(np.float64)
    return (numeric >= threshold).astype(np.int8)


def validate_events(
    raw: pd.DataFrame,
    path: str | Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    label_col: str | None,
    rating_col: str | None,
    rating_threshold: float | None,
) -> pd.DataFrame:
    """Turn `read_columns` output (meanings user/item/timestamp/label|rating) into typed events."""
    role = "events"
    events = pd.DataFrame(
        {
            "user": to_id(raw["user"], _where(path, role, user_col, "user id")),
            "item": to_id(raw["item"], _where(path, role, item_col, "item id")),
            "timestamp": to_int64(raw["timestamp"], _where(path, role, time_col, "timestamp")),
        }
    )
    if label_col is not None:
        events["label"] = label_from_column(raw["label"], _where(path, role, label_col, "label"))
    else:
        assert rating_col is not None and rating_threshold is not None
        where = _where(path, role, rating_col, "rating")
        events["label"] = label_from_rating(raw["rating"], rating_threshold, where)
    return events
