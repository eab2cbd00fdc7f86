"""Values of an event log as they come → the typed columns the dataset builder takes.

- **Ids** (users, items): integers in 0..2**63-1 are their own keys (key scheme ``int``); text ids (hashes,
  UUIDs, any string) are keyed by ``blake2b-63`` (:mod:`cachestore.user_keys`), after a check that no two
  distinct ids of the file share a key. ``--user-ids`` / ``--item-ids``: ``auto`` (the scheme of the
  catalogue being extended; else ``string`` when a value is text that is no number, else ``int``), ``int``
  or ``string`` (every id taken as text, integers as their decimal digits).
- **Times**: numbers are taken as they are, in the unit ``--time-unit`` states (default seconds); ISO-8601
  text ("2023-05-14T09:12:00Z", "2023-05-14"; no offset = UTC), text in a ``--time-format`` (strptime),
  Parquet timestamp and date32/date64 columns are converted to integers of that unit since 1970-01-01 UTC.
- **Genres**: values listed in ``--ignore-genre`` (compared case-insensitively; ``(no genres listed)``
  always) are placeholders, not genres.

:func:`read_event_log` reads an events file into an :class:`EventLog`; :func:`read_genres` the item
side-feature file. Every problem is a DataError naming the file, the column and the first bad row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from collectivekv.cachestore.store.data_error import DataError
from collectivekv.cachestore.store.user_keys import BLAKE2B_63, INT, UserKeyError, first_collision, hash_texts, id_text
from collectivekv.pipeline.data.event_formats import first_bad, preview_text, read_frame, reject_lists
from collectivekv.pipeline.data.events import (
    NO_GENRES,
    _where,
    check_no_nulls,
    label_from_column,
    label_from_rating,
    to_id,
    to_int64,
)

ID_MODES = ("auto", "int", "string")
SCHEME_OF_MODE = {"int": INT, "string": BLAKE2B_63}
MODE_OF_SCHEME = {v: k for k, v in SCHEME_OF_MODE.items()}
TIME_UNITS = {"s": pd.Timedelta(seconds=1), "ms": pd.Timedelta(milliseconds=1),
              "us": pd.Timedelta(microseconds=1), "ns": pd.Timedelta(nanoseconds=1)}
TIME_INPUTS = ("number", "iso-8601", "format", "date", "timestamp")


@dataclass(frozen=True)
class KeyedIds:
    """Ids keyed: ``keys`` int64 per row; ``scheme`` "int" | "blake2b-63"; for text ids the distinct ids
    (``names``, object array of str) and their keys (``name_keys``), aligned."""

    keys: np.ndarray
    scheme: str
    names: np.ndarray | None = None
    name_keys: np.ndarray | None = None

    def name_map(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.names is None else (self.name_keys, self.names)  # type: ignore[return-value]


def merge_names(parts: Iterable[KeyedIds], where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The (keys, text ids) of several keyed columns together (None for integer ids); DataError when two
    distinct text ids of different columns share a key."""
    named = [p for p in parts if p.names is not None]
    if not named:
        return None
    keys = np.concatenate([p.name_keys for p in named])  # type: ignore[misc]
    names = np.concatenate([p.names for p in named])  # type: ignore[misc]
    frame = pd.DataFrame({"key": keys, "name": names}).drop_duplicates().sort_values("key", kind="stable")
    clash = frame["key"].duplicated(keep=False).to_numpy()
    if clash.any():
        a, b = frame["name"].to_numpy(object)[clash][:2]
        raise DataError(f"{where}: ids {preview_text(a)} and {preview_text(b)} have the same {BLAKE2B_63} key "
                        f"{int(frame['key'].to_numpy()[clash][0])}: rename one of them")
    return frame["key"].to_numpy(np.int64), frame["name"].to_numpy(object)


def resolve_id_mode(requested: str, previous_scheme: str | None, option: str, previous: str = "") -> str:
    """``int`` / ``string`` / ``auto`` (returned as is when nothing is extended): the mode of a run that
    extends data keyed by ``previous_scheme`` (None: nothing extended). A mode that would change the keys
    of the extended data is refused."""
    if requested not in ID_MODES:
        raise DataError(f"{option} {requested!r}: expected one of {ID_MODES}")
    if previous_scheme is None:
        return requested
    kept = MODE_OF_SCHEME[previous_scheme]
    if requested not in ("auto", kept):
        raise DataError(f"{option} {requested}: the catalogue this run extends{previous} keys these ids as "
                        f"{kept!r} ({previous_scheme}); the keys must stay the same from day to day "
                        "(give --new-catalogue to start afresh)")
    return kept


def looks_textual(values: pd.Series) -> bool:
    """True when some value is text that is not a number (nor True/False): an id column of names."""
    if values.dtype != object:
        return False
    strings = pd.Series(pd.unique(values[values.map(lambda v: isinstance(v, str))].to_numpy(object)), dtype=object)
    if strings.empty:
        return False
    stripped = strings.str.strip()
    numeric = pd.to_numeric(stripped, errors="coerce").notna() | stripped.str.lower().isin(("true", "false"))
    return not bool(numeric.all())


def _texts(values: pd.Series, where: str) -> pd.Series:
    """Each id's text (:func:`cachestore.user_keys.id_text`); floats, booleans and empty text are refused."""
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.astype(np.int64).astype(str).astype(object)
    if pd.api.types.is_float_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        raise DataError(f"{where}: ids taken as text must be text or integers, the column holds {values.dtype} "
                        f"values, {first_bad(np.ones(len(values), bool), values)}")

    def text(v: object) -> str | None:
        try:
            t = id_text(v)
        except (UserKeyError, UnicodeDecodeError):
            return None
        return t or None

    out = values.map(text)
    bad = out.isna().to_numpy()
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} value(s) that are neither non-empty text nor an integer, "
                        f"{first_bad(bad, values)}")
    return out


def key_ids(values: pd.Series, mode: str, where: str, option: str) -> KeyedIds:
    """Key an id column (module docstring). ``mode``: auto / int / string (already resolved against the
    catalogue being extended); ``option`` names the CLI option in hints (``--user-ids``)."""
    if pd.api.types.infer_dtype(values, skipna=False) != "string":  # (all text: neither lists nor nulls)
        reject_lists(values, where, "one id")
        check_no_nulls(values, where)
    if mode == "auto":
        mode = "string" if looks_textual(values) else "int"
    if mode == "int":
        try:
            return KeyedIds(to_id(values, where), INT)
        except DataError as exc:
            raise DataError(f"{exc} (ids that are text: {option} string)") from None
    if pd.api.types.infer_dtype(values, skipna=False) == "string":  # all text: factorize first, check the distinct
        codes, uniques = pd.factorize(values)
        empty = np.asarray([not u for u in uniques.tolist()], dtype=bool)
        if empty.any():
            _texts(values, where)  # raises, naming the row of the first empty id
    else:
        codes, uniques = pd.factorize(_texts(values, where))
    names = np.asarray(uniques, dtype=object)
    name_keys = hash_texts(names.tolist())
    clash = first_collision(names, name_keys)
    if clash is not None:
        a, b, key = clash
        raise DataError(f"{where}: ids {preview_text(a)} and {preview_text(b)} have the same {BLAKE2B_63} key {key}: "
                        "rename one of them (two distinct ids must never share a key)")
    return KeyedIds(name_keys[codes], BLAKE2B_63, names, name_keys)


def _date_cells(values: pd.Series) -> str | None:
    """"date" / "timestamp" when every cell is a datetime.date / datetime (Parquet date32 → object)."""
    if values.dtype != object or len(values) == 0:
        return None
    kinds = values.map(lambda v: "timestamp" if isinstance(v, dt.datetime | pd.Timestamp)
                       else "date" if isinstance(v, dt.date) else "")
    if (kinds == "").any():
        return None
    return "date" if (kinds == "date").all() else "timestamp"


def _since_epoch(stamps: pd.Series, unit: str) -> np.ndarray:
    stamps = pd.to_datetime(stamps, utc=True)
    return ((stamps - pd.Timestamp(0, tz="UTC")) // TIME_UNITS[unit]).to_numpy(np.int64)


def to_times(values: pd.Series, where: str, unit: str = "s", time_format: str | None = None) -> tuple[np.ndarray, str]:
    """Times → (int64 array in ``unit``, the input kind: number / iso-8601 / format / date / timestamp)."""
    if unit not in TIME_UNITS:
        raise DataError(f"--time-unit {unit!r}: expected one of {tuple(TIME_UNITS)}")
    reject_lists(values, where, "one time")
    check_no_nulls(values, where)
    native = pd.api.types.is_datetime64_any_dtype(values.dtype)
    cells = "timestamp" if native else _date_cells(values)
    if cells is not None:
        try:
            stamps = values if native else pd.Series(pd.to_datetime(values.tolist(), utc=True))
            return _since_epoch(stamps, unit), cells
        except pd.errors.OutOfBoundsDatetime as exc:  # pandas keeps times as int64 nanoseconds: 1677..2262
            raise DataError(f"{where}: a time outside 1677-09-21 .. 2262-04-11 ({exc}); write times as numbers "
                            "(seconds since the epoch) to go beyond") from None
    text = values.astype(str).str.strip() if values.dtype == object else values
    if time_format is None:
        numeric = values.dtype != object or pd.to_numeric(text, errors="coerce").notna().to_numpy()
        if np.all(numeric) or 2 * np.sum(numeric) >= len(values):  # numbers (the odd text one is reported)
            return to_int64(values, where), "number"
    kind = "iso-8601" if time_format is None else "format"
    parsed = pd.to_datetime(text, utc=True, format=time_format or "ISO8601", errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        wanted = "an ISO-8601 time (e.g. 2023-05-14T09:12:00Z)" if time_format is None else \
            f"a time in --time-format {time_format!r}"
        raise DataError(f"{where}: {int(bad.sum())} value(s) neither a number nor {wanted}, "
                        f"{first_bad(bad, values)}")
    return _since_epoch(parsed, unit), kind


@dataclass(frozen=True)
class EventLog:
    """Typed events (columns user, item, timestamp int64, label int8; input row order) and how they were read:
    the key schemes of users and items, the text item ids (keys, names) for the catalogue, the time input."""

    events: pd.DataFrame
    user_key: str = INT
    item_key: str = INT
    item_names: tuple[np.ndarray, np.ndarray] | None = None
    time: dict[str, Any] = field(default_factory=dict)


def read_event_log(
    path: str | Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    label_col: str | None = None,
    rating_col: str | None = None,
    rating_threshold: float | None = None,
    sep: str | None = None,
    user_ids: str = "auto",
    item_ids: str = "auto",
    time_unit: str = "s",
    time_format: str | None = None,
) -> EventLog:
    """Read and type an events file: exactly one of label_col / rating_col (+ threshold)."""
    if (label_col is None) == (rating_col is None):
        given = "both" if label_col is not None else "neither"
        raise DataError(
            f"events file {path}: give exactly one of a label column or a rating column "
            f"(got {given}: label column {label_col!r}, rating column {rating_col!r})"
        )
    if rating_col is not None and rating_threshold is None:
        raise DataError(f"events file {path}: rating column '{rating_col}' needs a rating threshold")
    columns = {"user": user_col, "item": item_col, "timestamp": time_col}
    columns.update({"label": label_col} if label_col is not None else {"rating": str(rating_col)})
    text = [m for m, mode in (("user", user_ids), ("item", item_ids)) if mode == "string"]
    raw = read_frame(path, columns, "events", sep=sep, text=text)
    role = "events"
    users = key_ids(raw["user"], user_ids, _where(path, role, user_col, "user id"), "--user-ids")
    items = key_ids(raw["item"], item_ids, _where(path, role, item_col, "item id"), "--item-ids")
    times, kind = to_times(raw["timestamp"], _where(path, role, time_col, "timestamp"), time_unit, time_format)
    events = pd.DataFrame({"user": users.keys, "item": items.keys, "timestamp": times})
    if label_col is not None:
        events["label"] = label_from_column(raw["label"], _where(path, role, label_col, "label"))
    else:
        assert rating_col is not None and rating_threshold is not None
        events["label"] = label_from_rating(raw["rating"], rating_threshold, _where(path, role, rating_col, "rating"))
    return EventLog(events, users.scheme, items.scheme, items.name_map(),
                    {"column": time_col, "input": kind, "unit": time_unit, **({"format": time_format}
                                                                               if time_format else {})})


def read_events(path: str | Path, **options: Any) -> pd.DataFrame:
    """:func:`read_event_log`'s events alone (columns user, item, timestamp int64, label int8)."""
    return read_event_log(path, **options).events


def placeholder_set(ignore: Iterable[str]) -> set[str]:
    """The genre values that mean "none": ``(no genres listed)`` and ``ignore``, case-folded and stripped."""
    return {NO_GENRES.casefold(), *(str(g).strip().casefold() for g in ignore)}


def read_genres(path: str | Path, *, item_col: str, feature_col: str, sep: str = "|", file_sep: str | None = None,
                item_key: str = INT, ignore: Iterable[str] = ()) -> pd.DataFrame:
    """Read the item side-feature file → one row per (item int64 key, genre str) pair.

    Items must be unique ids, keyed like the event log's (``item_key``); the feature text is split on
    ``sep``, stripped, and empty values and placeholders (:func:`placeholder_set`) dropped (an item may
    end up with no pairs). A Parquet list column holds the values itself.
    """
    mode = MODE_OF_SCHEME[item_key]
    raw = read_frame(path, {"item": item_col, "feature": feature_col}, "items", sep=file_sep,
                     text=["item"] if mode == "string" else [])
    where = _where(path, "items", item_col, "item id")
    items = key_ids(raw["item"], mode, where, "--item-ids").keys
    dup = pd.Series(items).duplicated().to_numpy()
    if dup.any():
        raise DataError(f"{where}: {int(dup.sum())} duplicate id(s), {first_bad(dup, raw['item'])}")
    feature = raw["feature"]
    if feature.dtype == object and feature.map(lambda v: isinstance(v, list | tuple | np.ndarray)).any():
        lists = feature.map(lambda v: [] if v is None or (isinstance(v, float) and np.isnan(v)) else list(v))
    else:
        lists = feature.astype("string").fillna("").str.split(sep, regex=False)
    pairs = pd.DataFrame({"item": items, "genre": lists}).explode("genre")
    pairs["genre"] = pairs["genre"].astype("string").str.strip()
    skip = placeholder_set(ignore)
    keep = pairs["genre"].notna() & (pairs["genre"] != "")
    keep &= ~pairs["genre"].fillna("").str.casefold().isin(skip)
    out = pairs[keep.to_numpy()].reset_index(drop=True)
    return pd.DataFrame({"item": out["item"].to_numpy(np.int64), "genre": out["genre"].astype(str).to_numpy()})
