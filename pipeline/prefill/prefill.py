"""The per-partition prefill: Arrow history batches in, prefill Parquet rows out (no Spark here).

:func:`prefill_batches` is the whole per-partition computation of the nightly job
(``pipeline/prefill/spark_job.py`` only wraps it in ``mapInArrow``); it is a pure function of its input
batches, so it is tested, profiled and run on a GPU without a SparkSession.

Input batches: ``user_id`` int64, ``items`` list<int>, ``labels`` list<int> (0/1), one row per user,
the user's FULL history in time order (other columns are ignored). The model's window is the last
``cfg.max_len`` events (:func:`pipeline.data.history.arrow_window`, the one place that builds model input).

Output batches: exactly :data:`OUTPUT_SCHEMA` (= ``cachestore.store.entry.entry_schema()`` =
``cachestore.store.lmdb_build.prefill_schema()``; not imported from lmdb_build so that this module needs no
``lmdb``), one row per input row, same order. Per user with ``n = min(len(history), window)``
behaviours (window = ``layout.max_len``, the model's ``window_len``): ``payload`` = the user's record
payload, every part of the layout (``model.cache_spec.entry_parts``) in order, ``min(n, cap)`` rows
each, at the layout's storage dtypes; ``checksum`` = ``zlib.crc32(payload)``. For ``din``:

- collective: ``kv.k_user`` / ``kv.v_user`` = the (n, d_u) user-specific parts, ``kv.k_idx`` /
  ``kv.v_idx`` = the n router indices (uint16 while the pool has <= 65,536 rows); a side that is not
  shared stores its whole d_a-dim K (or V) and no indices;
- full: ``kv.k_user`` / ``kv.v_user`` = the whole (n, d_a) K and V as the model rebuilds them
  (``model.keys_values``), no indices — the baseline cache capacity planners compare against.

A zoo model's (SIM, ETA, SDIM, TWIN, HSTU) payload holds each of its K/V groups and retrieval keys
(mode full: the parts of the full config, every group's K/V rebuilt at d_a).

Engines (how the K/V of a batch are computed; all give the model's own values):

- ``direct``: ``model.prefill`` on the padded window of each chunk of users (trimmed to the
  chunk's longest history), then ``model.keys_values`` in full mode. The reference.
- ``memo``: the cache entry of a behaviour depends only on its token (item, feedback) in this model
  family (no positions, no cross-behaviour terms; :func:`tokenwise` checks this on the loaded model
  and ``auto`` falls back to ``direct`` if it does not hold). So each worker runs ``model.prefill``
  on one-behaviour histories, once per token, in fixed blocks of the item vocabulary (so the bits
  never depend on which users asked: :class:`MemoEngine`), keeps the encoded entries in a table,
  and gathers every user's rows from it. Same values, a fraction of the router work (the
  (tokens x pool) router product dominates the direct path: ~200 users/s per CPU core at the
  paper's scale). Memory: the table is capped (``memo_bytes``) and reset when full.
- ``noop``: no model, entries of the right sizes from a fixed random block — the job's I/O floor
  (benchmarks/prefill.py).

Zoo archs: :class:`ZooEngine` (``auto`` / ``direct``: ``model.prefill`` per sub-chunk, like
``direct``) or ``noop``; ``memo`` is din-only and refused.

Records are deterministic: eval mode, no randomness, no timestamps, rows in input order.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from collectivekv.cachestore.store.entry import EntryLayout, entry_schema
from collectivekv.cachestore.store.record import HEADER_SIZE
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.events import EventSpec
from collectivekv.pipeline.data.history import arrow_window
from collectivekv.pipeline.prefill.prefill_engines import (  # noqa: F401  (re-exported: the prefill API in one place)
    DEFAULT_MEMO_BYTES,
    ENGINES,
    DirectEngine,
    FlatEntries,
    FlatKV,
    MemoEngine,
    NoopEngine,
    ZooEngine,
    _empty,
    _empty_entries,
    cache_layout,
    check_engine,
    flat_entries,
    make_engine,
    tokenwise,
)

if sys.byteorder != "little":  # the record format is little-endian; numpy views below are native
    raise ImportError("pipeline.prefill.prefill needs a little-endian host")

OUTPUT_SCHEMA = entry_schema()
# The same schema as a Spark DDL string (what mapInArrow is declared with).
OUTPUT_DDL = "user_id long, length int, payload binary, model_version string, checksum long"
HISTORY_COLUMNS = ("user_id", "items", "labels")
Engine = DirectEngine | MemoEngine | ZooEngine | NoopEngine


_POSITIONS_PER_CHUNK = 1 << 20  # padded (users x max_len) positions per chunk (auto batch_users)


INPUT_HINT = ("fix the histories (schema: docs/data_schema.md, histories.parquet) and re-run the job; "
              "nothing was published, the current store version is unchanged")


class PrefillInputError(ValueError):
    """A history batch that cannot be prefilled (missing column, wrong type, null, bad id).

    The message says what is wrong and where (file / user); :data:`INPUT_HINT` (what to do) is
    appended unless ``hint=False``."""

    def __init__(self, message: str, hint: bool = True) -> None:
        super().__init__(f"{message} ({INPUT_HINT})" if hint else message)


def check_histories_files(path: Path) -> None:
    """Before Spark starts: every local histories file is readable, non-empty Parquet (its footer magic
    ``PAR1``); a directory holds at least one data file (names starting with ``_`` / ``.`` are skipped)."""
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not f.name.startswith(("_", ".")))
    if not files:
        raise PrefillInputError(f"histories {path}: the directory holds no Parquet files")
    for f in files:
        try:
            size = f.stat().st_size
            if size == 0:
                raise PrefillInputError(f"histories file {f}: empty file (0 bytes): not Parquet")
            with open(f, "rb") as fh:
                fh.seek(max(0, size - 4))
                magic = fh.read(4)
        except OSError as exc:
            raise PrefillInputError(f"histories file {f}: cannot read it ({exc.strerror or exc})") from exc
        if size < 12 or magic != b"PAR1":
            raise PrefillInputError(f"histories file {f}: not a Parquet file ({size} bytes, no Parquet footer)")


def auto_batch_users(max_len: int) -> int:
    """Users per chunk when not given: about 1M padded positions (1,048 users at max_len 1,000)."""
    return int(min(8192, max(1, _POSITIONS_PER_CHUNK // max(1, max_len))))


# ------------------------------------------------------------------------------ per partition
def _binary(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A binary array over one contiguous numpy buffer and int32 byte offsets (zero-copy)."""
    if offsets[-1] > np.iinfo(np.int32).max:
        raise OverflowError("a prefill batch exceeds 2 GiB in one column: lower batch_users")
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1,
                                 [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(values)])


def _check_batch(batch: pa.RecordBatch, n_items: int | None, extra: tuple[str, ...] = ()) -> None:
    names = batch.schema.names
    for col in (*HISTORY_COLUMNS, *extra):
        if col not in names:
            raise PrefillInputError(f"history batch has no column {col!r} (columns: {names})")
    if not pa.types.is_integer(batch.schema.field("user_id").type):
        raise PrefillInputError(f"column 'user_id' has type {batch.schema.field('user_id').type}, expected int64")
    for col in ("items", "labels", *extra):
        t = batch.schema.field(col).type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)):
            raise PrefillInputError(f"column {col!r} has type {t}, expected a list of integers")
    uid = batch.column("user_id")
    for col in (*HISTORY_COLUMNS, *extra):
        arr = batch.column(col)
        if arr.null_count:
            row = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
            who = f"row {row} of the batch" if col == "user_id" else f"user {uid[row]}"
            raise PrefillInputError(f"{who}: null {col!r}")
    ids = uid.to_numpy(zero_copy_only=False)
    if ids.size and (ids.min() < 0 or (ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max)):
        row = int(np.flatnonzero((ids < 0) | (ids > np.iinfo(np.int64).max))[0])
        raise PrefillInputError(f"user {ids[row]}: user ids must be in 0..2**63-1 (store keys are unsigned)")
    lens = {}
    for col in ("items", "labels"):
        arr = _rebase(batch.column(col))
        if arr.values.null_count:  # a null inside a list (the column's own null_count misses it)
            offsets = np.asarray(arr.offsets)
            pos = int(np.flatnonzero(np.asarray(arr.values.is_null()))[0])
            row = int(np.searchsorted(offsets, pos, side="right") - 1)
            raise PrefillInputError(f"user {ids[row]}: null element in {col!r} (position {pos - offsets[row]})")
        lens[col] = np.diff(np.asarray(arr.offsets))
    if not np.array_equal(lens["items"], lens["labels"]):
        row = int(np.flatnonzero(lens["items"] != lens["labels"])[0])
        raise PrefillInputError(f"user {ids[row]}: {lens['items'][row]} items but {lens['labels'][row]} labels")


def _rebase(arr: pa.Array) -> pa.Array:
    """A list array whose offsets start at 0 (a slice otherwise drags its whole parent's values)."""
    offsets = np.asarray(arr.offsets)
    if offsets[0] == 0 and len(arr.values) == offsets[-1]:
        return arr
    start, stop = int(offsets[0]), int(offsets[-1])
    cls = pa.LargeListArray if pa.types.is_large_list(arr.type) else pa.ListArray
    return cls.from_arrays(pa.array(offsets - start), arr.values.slice(start, stop - start))


def _entry_batch(users: pa.Array, lengths: np.ndarray, out: FlatEntries, layout: EntryLayout) -> pa.RecordBatch:
    """Output rows: one payload per user + its crc32."""
    sizes = np.diff(out.offsets)
    want = layout.record_sizes(lengths) - HEADER_SIZE
    if len(sizes) != len(lengths) or not np.array_equal(sizes, want) or out.offsets[0] != 0 \
            or len(out.values) != out.offsets[-1]:
        raise AssertionError(f"engine returned payloads of {sizes.tolist()[:8]} bytes, lengths imply "
                             f"{want.tolist()[:8]}")
    mv, off = memoryview(np.ascontiguousarray(out.values)), out.offsets.tolist()
    crc32 = zlib.crc32
    crcs = np.fromiter((crc32(mv[off[b] : off[b + 1]]) for b in range(len(lengths))), np.int64, len(lengths))
    mv_col = pa.array([layout.model_version] * len(lengths), pa.string())
    return pa.RecordBatch.from_arrays(
        [users, pa.array(lengths.astype(np.int32)), _binary(out.values, out.offsets), mv_col, pa.array(crcs)],
        schema=OUTPUT_SCHEMA)


def prefill_chunk(batch: pa.RecordBatch, engine: Engine, layout: EntryLayout,
                  n_items: int | None = None, events: EventSpec | None = None) -> pa.RecordBatch:
    """One chunk of users (a record batch of histories) → one output record batch (:data:`OUTPUT_SCHEMA`);
    ``events``: the model's per-event features (the batch then needs ``timestamps``)."""
    events = events or EventSpec()
    _check_batch(batch, n_items, ("timestamps",) if events.features else ())
    users = batch.column("user_id").cast(pa.int64())
    ts = _rebase(batch.column("timestamps")) if events.features else None
    w = arrow_window(_rebase(batch.column("items")), _rebase(batch.column("labels")), layout.max_len, ts, events)
    lengths = w.lengths
    valid = np.arange(w.items.shape[1])[None, :] < lengths[:, None]
    if n_items is not None and valid.any():
        bad = valid & ((w.items < 1) | (w.items > n_items) | (w.feedback < 1) | (w.feedback >= events.n_feedback))
        if bad.any():
            b, pos = np.argwhere(bad)[0]
            raise PrefillInputError(
                f"user {users[int(b)]}: item {int(w.items[b, pos])} / label {int(w.feedback[b, pos]) - 1} "
                f"outside the model's items 1..{n_items} / labels 0..1")
    if not lengths.sum():
        return _entry_batch(users, lengths, _empty_entries(len(lengths)), layout)
    out = engine.run(w.items, w.feedback, lengths)
    return _entry_batch(users, lengths, flat_entries(out, lengths) if isinstance(out, FlatKV) else out, layout)


def prefill_batches(batches: Iterable[pa.RecordBatch], model: TargetAttentionCTR | torch.nn.Module | Engine | None,
                    layout: EntryLayout, batch_users: int = 0,
                    counts: dict[str, int] | None = None) -> Iterator[pa.RecordBatch]:
    """The per-partition prefill: history batches → output batches (:data:`OUTPUT_SCHEMA`), in input order.

    ``model``: a model in eval mode (TargetAttentionCTR, or a zoo model; wrapped
    in ``make_engine(model, layout)``), or an engine; ``batch_users``: users per output batch (0:
    :func:`auto_batch_users`). ``counts``: if given, ``users`` and ``truncated`` (users whose
    history is longer than max_len: only the latest max_len events are cached) are added to it as
    chunks are produced.
    """
    engine = model if isinstance(model, Engine) else make_engine(model, layout)
    with_model = isinstance(engine, DirectEngine | MemoEngine | ZooEngine)
    n_items = engine.model.cfg.n_items if with_model else None
    events = EventSpec.of(engine.model.cfg) if with_model else EventSpec()
    step = batch_users or auto_batch_users(layout.max_len)
    for batch in batches:
        for lo in range(0, batch.num_rows, step):
            chunk = batch.slice(lo, step)
            out = prefill_chunk(chunk, engine, layout, n_items, events)
            if counts is not None:
                full = np.diff(np.asarray(chunk.column("items").offsets))
                counts["users"] = counts.get("users", 0) + chunk.num_rows
                counts["truncated"] = counts.get("truncated", 0) + int((full > layout.max_len).sum())
            yield out
