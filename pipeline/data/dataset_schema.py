"""The canonical dataset written by `ckv data prepare`: schema constants, loader, validator.

Directory layout (all Parquet written with pyarrow; types exact):

    OUT/meta.json            {"schema_version": 2, "n_users", "n_items", "n_genres", "genres",
                              "splits": {"kind": "global", "valid_start", "test_start"} or
                                        {"kind": "per-user", "valid_events", "test_events", "min_events"} or
                                        {"kind": "source", "files"} (ckv data import),
                              "history": {"kind": "events"} (default) or {"kind": "sequence", ...},
                              "split_fractions",
                              "label_rule", "source": {"events", "items", "sha256"}, "counts",
                              "catalogue": {"file", "sha256", "previous_sha256", "new_items"}}
    OUT/catalogue.parquet    the item catalogue (cachestore/store/catalogue.py): raw id <-> dense id, genres
    OUT/items.parquet        item_id int32 (dense 1..n_items; 0 = padding, never used),
                             raw_item int64 (distinct), genre_ids list<int32> (dense 1..n_genres,
                             maybe empty); one row per catalogue item (items of earlier days too,
                             so n_items >= the event log's items), sorted by item_id
    OUT/histories.parquet    user_id int64 (raw id), items list<int32>, timestamps list<int64>,
                             labels list<int8>; one row per user sorted by user_id, lists in time
                             order (stable sort by timestamp, then input row order)
    OUT/samples/{train,valid,test}.parquet
                             user_id int64, item_id int32, label int8, timestamp int64,
                             hist_len int32 (# of the user's events with timestamp strictly
                             smaller than this sample's); sorted by (timestamp, user_id, item_id)

History kinds (meta "history"): "events" (`ckv data prepare`, the default): a history holds every event
of its user and each event is one sample (samples = history events, hist_len < the history's length).
"sequence" (`ckv data import`: FuxiCTR / LongCTR): a history is the source's behaviour sequence, the
samples are the source's rows scored against a prefix of it (hist_len <= the history's length; the
counts need not match).

`meta["genres"][i]` is the name of genre id i + 1. Dense ids are the catalogue's: an item keeps its
id from day to day, new items are appended. A schema_version 1 dataset (no catalogue) still loads,
with the identity catalogue (raw id = dense id, as its models were served). Splits are by global time
(train ts < valid_start <= valid ts < test_start <= test ts; no "kind": a dataset written before the
per-user split), per user (each user's last events: pipeline/data/split.py) or as the source's files
gave them ("source"). docs/data_schema.md has the details.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collectivekv.cachestore.store.data_error import DataError
from collectivekv.pipeline.data.split import DATASET_SPLIT_KINDS, check_per_user

if TYPE_CHECKING:
    from collectivekv.cachestore.store.catalogue import ItemCatalogue

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # 1: before the item catalogue (identity catalogue)
PAD_ITEM_ID = 0
META_FILE = "meta.json"
ITEMS_FILE = "items.parquet"
HISTORIES_FILE = "histories.parquet"
SAMPLES_DIR = "samples"
SPLITS: tuple[str, str, str] = ("train", "valid", "test")
HISTORY_KINDS: tuple[str, str] = ("events", "sequence")  # meta "history" kind (module docstring)

ITEMS_SCHEMA = pa.schema([("item_id", pa.int32()), ("raw_item", pa.int64()), ("genre_ids", pa.list_(pa.int32()))])
HISTORIES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
        ("labels", pa.list_(pa.int8())),
    ]
)
SAMPLES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int32()),
        ("label", pa.int8()),
        ("timestamp", pa.int64()),
        ("hist_len", pa.int32()),
    ]
)
META_KEYS: tuple[str, ...] = (
    "schema_version",
    "n_users",
    "n_items",
    "n_genres",
    "genres",
    "splits",
    "split_fractions",
    "label_rule",
    "source",
    "counts",
)


@dataclass(frozen=True)
class CanonicalDataset:
    """A prepared dataset in memory: `meta` (meta.json) and the pyarrow tables described above.

    `samples` maps each split name in SPLITS to its table. `catalogue`: the item catalogue whose
    dense ids the tables use (None: a schema_version 1 dataset, see `item_catalogue`).
    """

    meta: dict[str, Any]
    items: pa.Table
    histories: pa.Table
    samples: Mapping[str, pa.Table]
    catalogue: ItemCatalogue | None = None

    @property
    def item_catalogue(self) -> ItemCatalogue:
        """The dataset's catalogue; the identity one (raw id = dense id) for a dataset without one."""
        from collectivekv.cachestore.store.catalogue import ItemCatalogue

        return self.catalogue or ItemCatalogue.identity(self.n_items, self.genres)

    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def n_genres(self) -> int:
        return int(self.meta["n_genres"])

    @property
    def genres(self) -> list[str]:
        return list(self.meta["genres"])


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores list child field names ("item" vs Parquet's "element")."""
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and _same_type(actual.value_type, expected.value_type)
    return actual.equals(expected)


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Check `table` has exactly `schema`'s columns and types, return it cast to `schema`."""
    if table.schema.names != schema.names:
        raise DataError(f"{where}: columns {table.schema.names}, expected {schema.names}")
    for field in schema:
        actual = table.schema.field(field.name).type
        if not _same_type(actual, field.type):
            raise DataError(f"{where}: column '{field.name}' has type {actual}, expected {field.type}")
    return table.cast(schema)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A prepared dataset's meta.json (DataError naming the file when it is missing or unreadable)."""
    root = Path(path)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{root}: not a prepared dataset (no {META_FILE}); run `ckv data prepare`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: unreadable meta.json ({exc}); prepare the dataset again") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: meta.json is not a JSON object; prepare the dataset again")
    return meta


def load_dataset(path: str | Path, *, validate: bool = True) -> CanonicalDataset:
    """Read a canonical dataset directory written by `ckv data prepare`."""
    root = Path(path)
    meta_path = root / META_FILE
    meta = read_meta(root)
    if meta.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise DataError(f"{meta_path}: schema_version {meta.get('schema_version')!r}, expected one of "
                        f"{READABLE_SCHEMA_VERSIONS}")

    def read(rel: str, schema: pa.Schema) -> pa.Table:
        file = root / rel
        if not file.is_file():
            raise DataError(f"{root}: missing {rel}")
        return conform(pq.read_table(file), schema, str(file))

    ds = CanonicalDataset(
        meta=meta,
        items=read(ITEMS_FILE, ITEMS_SCHEMA),
        histories=read(HISTORIES_FILE, HISTORIES_SCHEMA),
        samples={s: read(f"{SAMPLES_DIR}/{s}.parquet", SAMPLES_SCHEMA) for s in SPLITS},
        catalogue=_read_catalogue(root, meta),
    )
    if validate:
        validate_dataset(ds, where=str(root))
    return ds


def _read_catalogue(root: Path, meta: dict[str, Any]) -> ItemCatalogue | None:
    """The catalogue a schema_version 2 dataset records (hash checked against meta.json); None for 1."""
    if meta.get("schema_version") == 1:
        return None
    from collectivekv.cachestore.store.catalogue import load_catalogue

    rec = meta.get("catalogue")
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or "sha256" not in rec:
        raise DataError(f"{root / META_FILE}: no 'catalogue' record {{file, sha256}}; re-run `ckv data prepare`")
    return load_catalogue(root / rec["file"], expected_sha256=rec["sha256"])


def history_kind(meta: Mapping[str, Any]) -> str:
    """meta "history" kind: "events" (the default: every history event is a sample) or "sequence"."""
    return str((meta.get("history") or {}).get("kind", "events"))


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(col.to_numpy() if isinstance(col, pa.Array) else col.to_numpy())


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(flattened values, offsets of length rows + 1) of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = _np(pc.list_value_length(arr)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return _np(pc.list_flatten(arr)), offsets


def _check(ok: bool | np.bool_, where: str, what: str) -> None:
    if not ok:
        raise DataError(f"{where}: invalid canonical dataset: {what}")


def validate_dataset(ds: CanonicalDataset, where: str = "dataset") -> None:
    """Check every invariant of the canonical dataset (vectorised); raise DataError on the first break.

    Checks: meta keys; dense item ids 1..n_items with distinct raw ids (the catalogue's, when the
    dataset has one); genre ids in 1..n_genres;
    one history per user, sorted, lists aligned and time-ordered; samples sorted, inside
    their split's time range (global split) or each user's last events (per-user split:
    :func:`pipeline.data.split.check_per_user`), one per history event, and no leakage (hist_len
    equals the number of the user's events strictly before the sample's timestamp).
    """
    meta = ds.meta
    missing = [k for k in META_KEYS if k not in meta]
    _check(not missing, where, f"meta.json lacks keys {missing}")
    n_items, n_users, n_genres = ds.n_items, ds.n_users, ds.n_genres
    _check(len(meta["genres"]) == n_genres, where, "len(genres) != n_genres")

    item_id = _np(ds.items["item_id"])
    _check(np.array_equal(item_id, np.arange(1, n_items + 1)), where, "items.item_id is not 1..n_items")
    raw = _np(ds.items["raw_item"])
    _check(bool(np.all(np.diff(np.sort(raw)) > 0)), where, "items.raw_item not distinct")
    if ds.catalogue is not None:
        _check(np.array_equal(raw, ds.catalogue.raw_items), where, "items.raw_item differs from the catalogue")
        _check(list(ds.catalogue.genres) == list(meta["genres"]), where, "meta genres differ from the catalogue")
    genre_vals, _ = _flat(ds.items["genre_ids"])
    _check(bool(np.all((genre_vals >= 1) & (genre_vals <= n_genres))), where, "genre id out of 1..n_genres")

    users = _np(ds.histories["user_id"])
    _check(len(users) == n_users, where, "histories rows != n_users")
    _check(bool(np.all(np.diff(users) > 0)), where, "histories.user_id not strictly increasing")
    h_items, offsets = _flat(ds.histories["items"])
    h_ts, ts_off = _flat(ds.histories["timestamps"])
    h_lab, lab_off = _flat(ds.histories["labels"])
    _check(
        np.array_equal(offsets, ts_off) and np.array_equal(offsets, lab_off),
        where,
        "history lists differ in length",
    )
    _check(bool(np.all((h_items >= 1) & (h_items <= n_items))), where, "history item id out of 1..n_items")
    _check(bool(np.all((h_lab == 0) | (h_lab == 1))), where, "history label not 0/1")
    step = np.diff(h_ts)
    new_user = np.zeros(len(h_ts), dtype=bool)
    new_user[offsets[1:-1][offsets[1:-1] < len(h_ts)]] = True  # (an empty history starts nothing)
    _check(bool(np.all((step >= 0) | new_user[1:])), where, "history timestamps not time-ordered")

    _check_splits(ds, users, offsets, h_ts, where)


def _check_splits(ds: CanonicalDataset, users: np.ndarray, offsets: np.ndarray, h_ts: np.ndarray, where: str) -> None:
    """Every split's samples (:func:`_check_samples`), the history kind's rule (one sample per history event for
    "events") and the split kind's rule."""
    n_items = ds.n_items
    splits = ds.meta["splits"]
    kind, history = splits.get("kind", "global"), history_kind(ds.meta)
    _check(kind in DATASET_SPLIT_KINDS, where, f"unknown split kind {kind!r}")
    _check(history in HISTORY_KINDS, where, f"unknown history kind {history!r}")
    bounds: dict[str, tuple[int | None, int | None]]
    if kind == "global":
        valid_start, test_start = splits["valid_start"], splits["test_start"]
        bounds = {"train": (None, valid_start), "valid": (valid_start, test_start), "test": (test_start, None)}
    else:
        bounds = dict.fromkeys(SPLITS, (None, None))
    total = 0
    for split in SPLITS:
        total += ds.samples[split].num_rows
        _check_samples(ds.samples[split], split, bounds[split], users, offsets, h_ts, n_items, where,
                       whole=history == "sequence")
    _check(history != "events" or total == len(h_ts), where, "number of samples != number of history events")
    if kind == "per-user":
        broken = check_per_user(users, offsets, {k: _np(t["user_id"]) for k, t in ds.samples.items()},
                                {k: _np(t["timestamp"]) for k, t in ds.samples.items()}, splits)
        _check(broken is None, where, f"per-user split: {broken}")


def _check_samples(t: pa.Table, split: str, bounds: tuple[int | None, int | None], users: np.ndarray,
                   offsets: np.ndarray, h_ts: np.ndarray, n_items: int, where: str, *, whole: bool = False) -> None:
    """One split's samples: inside its time range ``bounds``, sorted, item ids valid, of a known user, and no
    leakage (hist_len = the user's events strictly before the sample's timestamp). ``whole``: a sample may
    see its user's whole history (hist_len = its length; a "sequence" history), else it is one of the events."""
    ts, uid = _np(t["timestamp"]), _np(t["user_id"])
    iid, hl = _np(t["item_id"]).astype(np.int64), _np(t["hist_len"]).astype(np.int64)
    lo, hi = bounds
    _check(lo is None or bool(np.all(ts >= lo)), where, f"{split} sample before its split start")
    _check(hi is None or bool(np.all(ts < hi)), where, f"{split} sample at/after the next split start")
    same_t, same_u = ts[1:] == ts[:-1], uid[1:] == uid[:-1]
    ascending = (ts[1:] > ts[:-1]) | (same_t & ((uid[1:] > uid[:-1]) | (same_u & (iid[1:] >= iid[:-1]))))
    _check(bool(np.all(ascending)), where, f"{split} samples not sorted by (timestamp, user, item)")
    _check(bool(np.all((iid >= 1) & (iid <= n_items))), where, f"{split} item id out of 1..n_items")
    row = np.searchsorted(users, uid)
    known = row < len(users)
    known[known] = users[row[known]] == uid[known]
    _check(bool(np.all(known)), where, f"{split} sample for a user without history")
    start, length = offsets[row], offsets[row + 1] - offsets[row]
    _check(bool(np.all((hl >= 0) & (hl <= length - (0 if whole else 1)))), where, f"{split} hist_len out of range")
    has = hl > 0
    _check(
        bool(np.all(h_ts[start[has] + hl[has] - 1] < ts[has])),
        where,
        f"{split} history leaks (ts >= sample)",
    )
    inside = hl < length  # a later history event exists: it must not be before the sample
    _check(bool(np.all(h_ts[start[inside] + hl[inside]] >= ts[inside])), where, f"{split} hist_len too small")
