"""Build the canonical dataset (pipeline/dataset_schema.py) from an event log.

`build_dataset` is pure: typed events (user, item, timestamp, label; input row order) and
optional (item, genre) pairs in, a CanonicalDataset out. `prepare` is the shell: read and
validate the inputs (pipeline/events.py), build, validate, and write atomically
(pipeline/safe_output.py: a temp directory beside OUT, then a rename; an existing dataset at OUT
is replaced only with `overwrite` and only on success; anything else at OUT is refused).

Everything is vectorised with numpy/pyarrow: one stable sort by (user, timestamp, row) gives
the histories and each event's hist_len, one by (timestamp, user, item, row) the samples
(`stable_order` packs the keys into one int64 so each is a single argsort).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.catalogue import CATALOGUE_FILE, ItemCatalogue, load_catalogue
from pipeline.dataset_schema import (
    HISTORIES_FILE,
    HISTORIES_SCHEMA,
    ITEMS_FILE,
    ITEMS_SCHEMA,
    META_FILE,
    SAMPLES_DIR,
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    SPLITS,
    CanonicalDataset,
    DataError,
    validate_dataset,
)
from pipeline.prepare_inputs import read_log, read_pairs, source_record
from pipeline.safe_output import OutputKind, check_output_dir, replace_dir

INT32_MAX = np.iinfo(np.int32).max
DATASET_OUTPUT = OutputKind("dataset", "ckv data prepare",
                            frozenset({META_FILE, ITEMS_FILE, HISTORIES_FILE, SAMPLES_DIR, CATALOGUE_FILE}),
                            signature=(META_FILE, HISTORIES_FILE))


@dataclass(frozen=True)
class PrepareConfig:
    """Inputs, column names and split fractions of `ckv data prepare`.

    Exactly one of `events` (with exactly one of `label_col` (0/1 values) or `rating_col` (label =
    rating >= rating_threshold)) or `impressions` (+ `history`, pipeline/impressions.py) must be set.
    `items_item_col` defaults to `item_col`. Formats of the values: pipeline/event_values.py.
    """

    events: Path | None
    out: Path
    items: Path | None = None
    user_col: str = "userId"
    item_col: str = "movieId"
    time_col: str = "timestamp"
    label_col: str | None = None
    rating_col: str | None = None
    rating_threshold: float | None = None
    items_item_col: str | None = None
    item_feature_col: str = "genres"
    feature_sep: str = "|"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    catalogue: Path | None = None  # previous catalogue: a catalogue.parquet, a dataset or a checkpoint dir
    new_catalogue: bool = False  # start a fresh catalogue even if `out` holds one
    overwrite: bool = False  # replace an existing dataset at `out` (never anything else)
    sep: str | None = None  # separator of every text input file [default: by extension]
    user_ids: str = "auto"  # auto | int | string (text ids, keyed by blake2b-63)
    item_ids: str = "auto"
    time_unit: str = "s"  # the unit of the timestamps (numbers are in it; dates / ISO times are converted to it)
    time_format: str | None = None  # strptime format of text times [default: numbers or ISO-8601]
    ignore_genres: tuple[str, ...] = ()  # placeholder genre values (besides "(no genres listed)")
    impressions: Path | None = None  # an impression log instead of `events`
    history: Path | None = None  # its read history
    shown_col: str = "shown"
    clicked_col: str = "clicked"
    labelled_impressions: bool = False  # the shown column holds item-label tokens ("N1-0 N7-1")
    list_sep: str = " "
    history_user_col: str | None = None  # [default: user_col]
    history_item_col: str | None = None  # [default: item_col]
    history_time_col: str | None = None  # [default: none: reads precede the earliest impression]

    def __post_init__(self) -> None:
        if (self.events is None) == (self.impressions is None):
            raise DataError("give either an event log (--events) or an impression log (--impressions)")
        if self.history is not None and self.impressions is None:
            raise DataError("--history is the read history of an impression log: give --impressions too")
        if self.impressions is not None and (self.label_col or self.rating_col):
            raise DataError("an impression log's labels come from its shown / clicked lists: drop --label-col / "
                            "--rating-col")
        if self.catalogue is not None and self.new_catalogue:
            raise DataError("give either a previous catalogue (--catalogue) or --new-catalogue, not both")
        if not (0 <= self.valid_frac < 1 and 0 <= self.test_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise DataError(f"split fractions valid={self.valid_frac}, test={self.test_frac}: need 0 <= each, sum < 1")

    @property
    def label_rule(self) -> str:
        if self.impressions is not None:
            from pipeline.prepare_inputs import impression_options

            return impression_options(self, self.user_ids, self.item_ids).label_rule
        if self.label_col is not None:
            return f"label = column '{self.label_col}' (0/1)"
        return f"label = 1 if column '{self.rating_col}' >= {self.rating_threshold} else 0"


def split_boundaries(timestamps: np.ndarray, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """(valid_start, test_start): the event timestamps at quantiles 1 - valid - test and 1 - test.

    valid_start = sorted_ts[floor((1 - valid_frac - test_frac) * n)], likewise test_start, so
    train = ts < valid_start, valid = valid_start <= ts < test_start, test = ts >= test_start.
    """
    n = len(timestamps)
    iv = min(int(np.floor((1.0 - valid_frac - test_frac) * n)), n - 1)
    it = min(int(np.floor((1.0 - test_frac) * n)), n - 1)
    part = np.partition(timestamps, sorted({iv, it}))
    return int(part[iv]), int(part[it])


def dense_rank(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int64, sorted unique values) with values == uniques[codes].

    When (value range) * n fits in int64, one np.sort of value * n + row does it; else np.unique.
    """
    n = len(values)
    low = int(values.min())
    span = int(values.max()) - low + 1
    if float(span) * n >= 2.0**62:
        uniques, codes = np.unique(values, return_inverse=True)
        return codes.reshape(-1).astype(np.int64, copy=False), uniques
    packed = np.sort((values.astype(np.int64) - low) * n + np.arange(n, dtype=np.int64))
    rows, ordered = packed % n, packed // n
    new = np.empty(n, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    codes = np.empty(n, np.int64)
    codes[rows] = np.cumsum(new) - 1
    return codes, ordered[new] + low


def stable_order(*keys: np.ndarray) -> np.ndarray:
    """Indices sorting rows by `keys` (primary first), ties kept in row order; like np.lexsort.

    Keys are packed into one int64 (each shifted to start at 0, mixed radix) for a single
    stable argsort, replacing the widest key by its dense rank if the ranges do not fit;
    np.lexsort is the fallback.
    """
    shifted = [
        k.astype(np.int64) - int(k.min()) if int(k.max()) - int(k.min()) < 2**62 else dense_rank(k)[0] for k in keys
    ]
    for attempt in range(2):
        ranges = [int(k.max()) + 1 for k in shifted]
        if float(np.prod([float(r) for r in ranges])) < 2.0**62:
            packed = np.zeros(len(keys[0]), np.int64)
            for k, r in zip(shifted, ranges, strict=True):
                packed *= r
                packed += k
            return np.argsort(packed, kind="stable")
        if attempt == 0:
            widest = int(np.argmax(ranges))
            shifted[widest] = dense_rank(shifted[widest])[0]
    return np.lexsort(tuple(reversed(keys)))


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def build_items(cat: ItemCatalogue, pairs: pd.DataFrame | None) -> tuple[pa.Table, ItemCatalogue]:
    """items.parquet with one row per item of `cat` (dense id order), and `cat` with the genres of
    its items appended (known genres keep their ids, new names are appended in sorted order).

    Genre lists come from `pairs` (item, genre); items without pairs get an empty list.
    """
    n = cat.n_items
    if pairs is None or len(pairs) == 0:
        offsets, values = np.zeros(n + 1, np.int64), np.zeros(0, np.int32)
    else:
        dense = cat.to_dense(pairs["item"].to_numpy(np.int64), unknown="zero")  # 0: not a catalogue item
        known = dense > 0
        genre = pairs["genre"].to_numpy(object)[known].astype(str)
        uniq, inverse = np.unique(genre, return_inverse=True)
        cat = cat.extend([], new_genres=uniq)
        gid = cat.genre_ids(uniq)[inverse]
        width = len(cat.genres) + 1
        keyed = np.unique((dense[known] - 1) * width + gid)  # sort by (item, genre) + dedupe
        item_pos, values = keyed // width, (keyed % width).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(item_pos, minlength=n))])
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(1, n + 1), pa.int32()),
            pa.array(cat.raw_items, pa.int64()),
            _list_array(offsets, values, pa.int32()),
        ],
        schema=ITEMS_SCHEMA,
    )
    return table, cat


def build_dataset(
    events: pd.DataFrame,
    pairs: pd.DataFrame | None = None,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    catalogue: ItemCatalogue | None = None,
    item_names: tuple[np.ndarray, np.ndarray] | None = None,
    user_key: str = "int",
    item_key: str = "int",
) -> CanonicalDataset:
    """Pure build. `events`: columns user, item, timestamp (int64), label (int8), input row order.

    Dense item ids come from `catalogue` extended with the event log's new items (None: a fresh
    catalogue, items in ascending raw id order). `item_names`: (keys, text ids) of items named by text;
    `user_key` / `item_key`: the key schemes (cachestore/user_keys.py), recorded in the catalogue and
    meta. meta gets everything but `label_rule` and `source` (left None for the caller to fill).
    """
    n = len(events)
    if n == 0:
        raise DataError("no events")
    user = events["user"].to_numpy(np.int64)
    ts = events["timestamp"].to_numpy(np.int64)
    label = events["label"].to_numpy(np.int8)
    codes, uniques = pd.factorize(events["item"].to_numpy(np.int64), sort=True)  # hash: few uniques
    raw_items = np.asarray(uniques, dtype=np.int64)
    previous = catalogue or ItemCatalogue(np.zeros(0, np.int64))
    cat = previous.with_keys(item_key, user_key).extend(raw_items, names=item_names)
    if cat.n_items >= INT32_MAX or n >= INT32_MAX:
        raise DataError(f"{cat.n_items} items / {n} events: too many for int32 ids / offsets")
    item = cat.to_dense(raw_items)[codes].astype(np.int32)
    items, cat = build_items(cat, pairs)
    genres = list(cat.genres)
    row = np.arange(n)

    # Histories: stable time order within each user; hist_len = start of the (user, ts) run
    # minus the start of the user's block = number of the user's events strictly earlier.
    order = stable_order(user, ts)
    u_s, t_s = user[order], ts[order]
    new_user = np.concatenate([[True], u_s[1:] != u_s[:-1]])
    new_run = new_user | np.concatenate([[True], t_s[1:] != t_s[:-1]])
    user_start = np.maximum.accumulate(np.where(new_user, row, 0))
    run_start = np.maximum.accumulate(np.where(new_run, row, 0))
    hist_len = np.empty(n, np.int32)
    hist_len[order] = run_start - user_start
    starts = np.flatnonzero(new_user)
    offsets = np.concatenate([starts, [n]])
    histories = pa.Table.from_arrays(
        [
            pa.array(u_s[starts], pa.int64()),
            _list_array(offsets, item[order], pa.int32()),
            _list_array(offsets, t_s, pa.int64()),
            _list_array(offsets, label[order], pa.int8()),
        ],
        schema=HISTORIES_SCHEMA,
    )

    # Samples: every event, sorted by (timestamp, user, item, row), cut at the split times.
    valid_start, test_start = split_boundaries(ts, valid_frac, test_frac)
    s_order = stable_order(ts, user, item)
    s_ts = ts[s_order]
    cuts = [0, int(np.searchsorted(s_ts, valid_start)), int(np.searchsorted(s_ts, test_start)), n]
    samples: dict[str, pa.Table] = {}
    counts: dict[str, Any] = {
        "events": n,
        "users": len(starts),
        "items": len(raw_items),
        "genres": len(genres),
        "positives": int(label.sum()),
        "positive_rate": float(label.mean()),
        "items_without_genres": int(np.sum(np.diff(np.asarray(items["genre_ids"].combine_chunks().offsets)) == 0)),
    }
    for split, lo, hi in zip(SPLITS, cuts[:-1], cuts[1:], strict=True):
        idx = s_order[lo:hi]
        samples[split] = pa.Table.from_arrays(
            [
                pa.array(user[idx], pa.int64()),
                pa.array(item[idx], pa.int32()),
                pa.array(label[idx], pa.int8()),
                pa.array(ts[idx], pa.int64()),
                pa.array(hist_len[idx], pa.int32()),
            ],
            schema=SAMPLES_SCHEMA,
        )
        pos = int(label[idx].sum())
        counts[split] = {
            "samples": len(idx),
            "positives": pos,
            "positive_rate": pos / len(idx) if len(idx) else 0.0,
            "users": len(np.unique(user[idx])),
        }
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "n_users": len(starts),
        "n_items": cat.n_items,
        "n_genres": len(genres),
        "genres": genres,
        "user_key": user_key,
        "item_key": item_key,
        "splits": {"valid_start": valid_start, "test_start": test_start},
        "split_fractions": [round(1.0 - valid_frac - test_frac, 10), valid_frac, test_frac],
        "label_rule": None,
        "source": None,
        "counts": counts,
        "catalogue": {
            "file": CATALOGUE_FILE,
            "sha256": cat.sha256,
            "previous_sha256": None if catalogue is None else catalogue.sha256,
            "new_items": cat.n_items - previous.n_items,
        },
    }
    return CanonicalDataset(meta=meta, items=items, histories=histories, samples=samples, catalogue=cat)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_dataset(ds: CanonicalDataset, out: str | Path, *, overwrite: bool = False,
                  inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Write `ds` to `out` atomically (pipeline/safe_output.py): a temp dir beside it, then a rename.

    A non-empty `out` that is not a dataset, or that is / contains one of `inputs`, is refused
    (OutputError); an existing dataset is replaced only with `overwrite`, and only on success.
    """
    out = Path(out)
    with replace_dir(out, DATASET_OUTPUT, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / SAMPLES_DIR).mkdir()
        (tmp / META_FILE).write_text(json.dumps(ds.meta, indent=2) + "\n")
        pq.write_table(ds.items, tmp / ITEMS_FILE)
        pq.write_table(ds.histories, tmp / HISTORIES_FILE)
        if ds.catalogue is not None:
            ds.catalogue.save(tmp / CATALOGUE_FILE)
        for split in SPLITS:
            pq.write_table(ds.samples[split], tmp / SAMPLES_DIR / f"{split}.parquet")
    return out


def previous_catalogue(config: PrepareConfig) -> ItemCatalogue | None:
    """The catalogue this run extends: `config.catalogue`, else the one of the dataset already at
    `config.out` (if any), else None (a fresh one). A directory gives its catalogue.parquet; a
    schema_version 1 dataset dir the ids it used (items.raw_item, meta genres)."""
    if config.new_catalogue:
        return None
    src = config.catalogue
    if src is None:
        out = Path(config.out)
        if not ((out / CATALOGUE_FILE).is_file() or (out / META_FILE).is_file()):
            return None
        src = out
    src = Path(src)
    if src.is_file() or (src / CATALOGUE_FILE).is_file():
        return load_catalogue(src)
    if (src / META_FILE).is_file() and (src / ITEMS_FILE).is_file():
        meta = json.loads((src / META_FILE).read_text())
        items = pq.read_table(src / ITEMS_FILE, columns=["raw_item"])
        return ItemCatalogue(items["raw_item"].to_numpy(), tuple(meta.get("genres") or ()))
    raise DataError(f"--catalogue {src}: no {CATALOGUE_FILE} there (give a catalogue file, a prepared dataset or "
                    "a checkpoint directory, or --new-catalogue to start afresh)")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Read + validate the inputs, build the canonical dataset, write it to config.out; return meta.

    config.out is checked first (OutputError before any work: see write_dataset).
    """
    inputs = (config.events, config.items, config.impressions, config.history)
    check_output_dir(Path(config.out), DATASET_OUTPUT, overwrite=config.overwrite, inputs=inputs)
    previous = previous_catalogue(config)
    log = read_log(config, previous)  # events or impressions, ids keyed, times converted
    pairs = read_pairs(config, log)
    ds = build_dataset(log.events, pairs, valid_frac=config.valid_frac, test_frac=config.test_frac,
                       catalogue=previous, item_names=log.item_names, user_key=log.user_key, item_key=log.item_key)
    ds.meta["label_rule"] = config.label_rule
    main_input = config.events if config.events is not None else config.impressions
    ds.meta["source"] = source_record(config, sha256_file(main_input))
    ds.meta["time"] = log.time
    validate_dataset(ds, where=f"prepared from {main_input}")
    write_dataset(ds, config.out, overwrite=config.overwrite, inputs=inputs)
    return ds.meta


def summary(meta: dict[str, Any]) -> str:
    """A few lines for the terminal: sizes, samples per split, positive rates."""
    c = meta["counts"]
    lines = [
        f"users {meta['n_users']:,}  items {meta['n_items']:,}  genres {meta['n_genres']}  "
        f"events {c['events']:,}  positive rate {c['positive_rate']:.3f}  ({meta['label_rule']})",
    ]
    for split in SPLITS:
        s = c[split]
        lines.append(
            f"  {split:<5} {s['samples']:>10,} samples  {s['users']:>8,} users  positive rate {s['positive_rate']:.3f}"
        )
    time = meta.get("time") or {}
    unit = f" ({time['unit']}, from {time['input']} column '{time['column']}')" if time else ""
    lines.append(f"  valid_start {meta['splits']['valid_start']}  test_start {meta['splits']['test_start']}{unit}")
    keys = [f"{what} ids keyed by {meta[k]}" for what, k in (("user", "user_key"), ("item", "item_key"))
            if meta.get(k, "int") != "int"]
    if keys:
        lines.append("  " + ", ".join(keys) + " (text ids)")
    cat = meta.get("catalogue")
    if cat:
        base = "a fresh catalogue" if cat["previous_sha256"] is None else f"extends {cat['previous_sha256'][:12]}"
        lines.append(f"  item catalogue {cat['sha256'][:12]}: {meta['n_items']:,} items, {cat['new_items']:,} new "
                     f"({base})")
    return "\n".join(lines)
