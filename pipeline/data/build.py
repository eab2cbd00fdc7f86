"""The pure build of a canonical dataset (pipeline/data/dataset_schema.py): typed events (user, item,
timestamp, label; input row order) and optional (item, genre) pairs in, a CanonicalDataset out.

Everything is vectorised with numpy/pyarrow: one stable sort by (user, timestamp, row) gives
the histories and each event's hist_len, one by (timestamp, user, item, row) the samples
(`stable_order` packs the keys into one int64 so each is a single argsort).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from collectivekv.cachestore.store.catalogue import CATALOGUE_FILE, ItemCatalogue
from collectivekv.pipeline.data.dataset_schema import (
    HISTORIES_SCHEMA,
    ITEMS_SCHEMA,
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    SPLITS,
    CanonicalDataset,
    DataError,
)
from collectivekv.pipeline.data.split import SPLIT_KINDS, global_assignment, per_user_assignment, per_user_meta

INT32_MAX = np.iinfo(np.int32).max


def split_boundaries(timestamps: np.ndarray, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """(valid_start, test_start): the event timestamps at quantiles 1 - valid - test and 1 - test.

    valid_start = sorted_ts[floor((1 - valid_frac - test_frac) * n)], likewise test_start, so
    train = ts < valid_start, valid = valid_start <= ts < test_start, test = ts >= test_start; a fraction of 0
    puts its boundary past the last event (that split is empty).
    """
    n = len(timestamps)
    iv = min(int(np.floor((1.0 - valid_frac - test_frac) * n)), n - 1)
    it = min(int(np.floor((1.0 - test_frac) * n)), n - 1)
    part = np.partition(timestamps, sorted({iv, it}))
    top = min(int(part.max()) + 1, int(np.iinfo(np.int64).max))  # past every event: a fraction of 0 is empty
    return (int(part[iv]) if valid_frac + test_frac > 0 else top), (int(part[it]) if test_frac > 0 else top)


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


def build_histories(user: np.ndarray, item: np.ndarray, ts: np.ndarray, label: np.ndarray
                    ) -> tuple[pa.Table, np.ndarray, int]:
    """(histories table, hist_len per event, users): each user's events in stable time order; an event's
    hist_len = start of its (user, ts) run minus the start of the user's block = the user's events strictly
    earlier."""
    n = len(user)
    row = np.arange(n)
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
    return histories, hist_len, len(starts)


def build_samples(user: np.ndarray, item: np.ndarray, ts: np.ndarray, label: np.ndarray, hist_len: np.ndarray,
                  assign: np.ndarray) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """(split → samples table, split → counts): every event, sorted by (timestamp, user, item, row), in the
    split its code in ``assign`` names (0 train, 1 valid, 2 test: :mod:`pipeline.data.split`)."""
    s_order = stable_order(ts, user, item)
    s_assign = assign[s_order]
    samples: dict[str, pa.Table] = {}
    counts: dict[str, Any] = {}
    for code, split in enumerate(SPLITS):
        idx = s_order[s_assign == code]
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
    return samples, counts


def split_events(user: np.ndarray, ts: np.ndarray, split: str, valid_frac: float, test_frac: float,
                 per_user: tuple[int, int], cut_over: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, Any], list[float] | None]:
    """(split code per event, meta["splits"], split fractions or None) of ``split`` ("global": the time cut
    at ``valid_frac`` / ``test_frac`` of the events ``cut_over`` (bool mask; None: all) selects; "per-user": the
    last ``per_user`` = (valid, test) events of every user; :mod:`pipeline.data.split`)."""
    if split == "global":
        over = ts if cut_over is None or not cut_over.any() else ts[cut_over]
        valid_start, test_start = split_boundaries(over, valid_frac, test_frac)
        return (global_assignment(ts, valid_start, test_start),
                {"kind": "global", "valid_start": valid_start, "test_start": test_start},
                [round(1.0 - valid_frac - test_frac, 10), valid_frac, test_frac])
    if split != "per-user":
        raise DataError(f"split {split!r}: expected one of {SPLIT_KINDS}")
    order = stable_order(user, ts)
    return per_user_assignment(order, user[order], *per_user), per_user_meta(*per_user), None


def build_dataset(
    events: pd.DataFrame,
    pairs: pd.DataFrame | None = None,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    catalogue: ItemCatalogue | None = None,
    split: str = "global",
    per_user: tuple[int, int] = (10, 10),
    item_names: tuple[np.ndarray, np.ndarray] | None = None,
    user_key: str = "int",
    item_key: str = "int",
) -> CanonicalDataset:
    """Pure build. `events`: columns user, item, timestamp (int64), label (int8), input row order; optionally
    history_only (bool: an impression log's read history, always in the past: the global time cut is placed over
    the other events, so the reads stay in train however many they are).

    ``split``: "global" (a time cut at ``valid_frac`` / ``test_frac``) or "per-user" (each user's last
    ``per_user`` = (valid, test) events; :mod:`pipeline.data.split`). Dense item ids come from `catalogue`
    extended with the event log's new items (None: a fresh catalogue, items in ascending raw id order),
    whatever the split: items and genres seen only in valid/test events get ids too (their embeddings stay
    at their initial values, since no training sample's target or history holds them). `item_names`: (keys,
    text ids) of items named by text; `user_key` / `item_key`: the key schemes (cachestore/store/user_keys.py),
    recorded in the catalogue and meta. meta gets everything but `label_rule` and `source` (left None for the
    caller to fill).
    """
    n = len(events)
    if n == 0:
        raise DataError("no events")
    user, ts = events["user"].to_numpy(np.int64), events["timestamp"].to_numpy(np.int64)
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
    histories, hist_len, n_users = build_histories(user, item, ts, label)
    cut_over = ~events["history_only"].to_numpy(bool) if "history_only" in events.columns else None
    assign, splits, fractions = split_events(user, ts, split, valid_frac, test_frac, per_user, cut_over)
    samples, split_counts = build_samples(user, item, ts, label, hist_len, assign)
    counts: dict[str, Any] = {
        "events": n, "users": n_users, "items": len(raw_items), "genres": len(genres),
        "positives": int(label.sum()), "positive_rate": float(label.mean()),
        "items_without_genres": int(np.sum(np.diff(np.asarray(items["genre_ids"].combine_chunks().offsets)) == 0)),
        **split_counts,
    }  # fmt: skip
    fractions = fractions or [round(split_counts[k]["samples"] / n, 6) for k in SPLITS]
    meta = dataset_meta(cat, previous, catalogue, counts, splits, fractions)
    return CanonicalDataset(meta=meta, items=items, histories=histories, samples=samples, catalogue=cat)


def dataset_meta(cat: ItemCatalogue, previous: ItemCatalogue, catalogue: ItemCatalogue | None,
                  counts: dict[str, Any], splits: dict[str, Any], fractions: list[float]) -> dict[str, Any]:
    """meta.json of a built dataset (label_rule and source left None for the caller)."""
    genres = list(cat.genres)
    return {
        "schema_version": SCHEMA_VERSION,
        "n_users": counts["users"],
        "n_items": cat.n_items,
        "n_genres": len(genres),
        "genres": genres,
        "user_key": cat.user_key,
        "item_key": cat.item_key,
        "splits": splits,
        "split_fractions": fractions,
        "label_rule": None,
        "source": None,
        "counts": counts,
        "catalogue": {"file": CATALOGUE_FILE, "sha256": cat.sha256,
                      "previous_sha256": None if catalogue is None else catalogue.sha256,
                      "new_items": cat.n_items - previous.n_items},
    }
