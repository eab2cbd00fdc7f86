"""Build one shard of a sharded store version from its users' prefill rows, sorted by user id.

Where it runs: inside the Spark task that holds the shard's partition (the prefill job's last stage:
``repartition(N, user_id)`` + ``sortWithinPartitions(user_id)``, :mod:`pipeline.prefill.spark_shards`), or in
one process for ``ckv store build --shards N`` (:func:`build_shards_from_parquet`). Memory is bounded by one
Arrow batch: nothing holds the shard's users.

Two passes over the rows:

1. stream the batches into ``parquet/part-<k>.parquet`` of the staging version, checking every row: its shard
   is ``k`` (:func:`cachestore.store.shards.shard_of`), user ids strictly increase (no duplicates), lengths in
   ``0..max_len``, no nulls; the record sizes' LMDB bytes are summed for the map size;
2. stream that file back through the unsharded builder's record encoder into LMDB, sorted keys with
   ``append=True`` in bounded write transactions (the records are byte for byte those of an unsharded store), and
   the shard's digest (:func:`cachestore.store.shards.records_digest`) over the same pairs.

Then the shard's ``manifest.json`` (stats, ``lmdb`` facts, ``shard``) and ``layout.json`` are written. All of it
goes to temporary names first and is renamed into place last, so a retried task attempt replaces a failed
one's output and never mixes with it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collectivekv.cachestore.store.entry import EntryLayout, entry_schema
from collectivekv.cachestore.store.lmdb_build import (
    StoreBuildError,
    iter_file_records,
    load_sorted,
    map_bytes,
    map_size_for,
    part_rows,
)
from collectivekv.cachestore.store.publish import MANIFEST_VERSION, write_json_synced
from collectivekv.cachestore.store.record import HEADER_SIZE, RecordError, user_key, write_layout
from collectivekv.cachestore.store.shards import (
    SHARD_FUNCTION,
    SHARDS_DIR,
    digest_update,
    records_digest,
    shard_name,
    shard_of,
)
from collectivekv.cachestore.store.store_tree import lmdb_facts

PARQUET_DIR = "parquet"
HISTORY_FP = "history_fp"  # the incremental prefill's fingerprint column (pipeline/prefill/incremental.py FP_COL)


def shard_schema() -> pa.Schema:
    """The columns of a sharded version's Parquet parts: the prefill columns + ``history_fp``."""
    return entry_schema().append(pa.field(HISTORY_FP, pa.int64()))


@dataclass(frozen=True)
class ShardTarget:
    """Where shard ``index`` of ``count`` goes: the staging version directory (``version_id`` is its name)."""

    staging: Path
    index: int
    count: int
    layout: EntryLayout
    compression: str = "snappy"

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass
class _Tally:
    users: int = 0
    empty: int = 0
    behaviours: int = 0
    record_bytes: int = 0
    map_total: int = 0
    last: int = -1
    part_rows: dict[str, int] = field(default_factory=dict)


def _check_batch(batch: pa.RecordBatch, t: ShardTarget, tally: _Tally) -> np.ndarray:
    """The batch's lengths after the row checks (module docstring, pass 1)."""
    for name in ("user_id", "length", "payload", "model_version", "checksum"):
        if batch.column(name).null_count:
            raise StoreBuildError(f"shard {t.index}: null values in column {name!r}")
    ids = batch.column("user_id").to_numpy().astype(np.int64)
    lengths = batch.column("length").to_numpy().astype(np.int64)
    if ids.size == 0:
        return lengths
    if int(ids.min()) < 0:
        raise RecordError("negative user id; keys are unsigned 8-byte big-endian", int(ids[ids < 0][0]))
    owners = shard_of(ids, t.count)
    if (owners != t.index).any():
        j = int(np.flatnonzero(owners != t.index)[0])
        raise StoreBuildError(f"user {int(ids[j])} belongs to shard {int(owners[j])}, not to shard {t.index} of "
                              f"{t.count}: the partitioning does not follow {SHARD_FUNCTION}; nothing was published")
    order = np.diff(np.concatenate([[tally.last], ids]))
    if (order <= 0).any():
        j = int(np.flatnonzero(order <= 0)[0])
        what = "duplicate user id" if order[j] == 0 else "user ids out of order"
        raise StoreBuildError(f"shard {t.index}: {what} at user {int(ids[j])}: every user must have exactly one "
                              "row, sorted within its shard")
    bad = np.flatnonzero((lengths < 0) | (lengths > t.layout.max_len))
    if bad.size:
        raise RecordError(f"length {int(lengths[bad[0]])} outside 0..max_len={t.layout.max_len}", int(ids[bad[0]]))
    tally.last = int(ids[-1])
    return lengths


def _write_parquet(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path, t: ShardTarget) -> _Tally:
    """Pass 1 (module docstring)."""
    tally = _Tally(part_rows={p.name: 0 for p in t.layout.parts})
    with pq.ParquetWriter(path, schema, compression=t.compression) as writer:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            batch = batch.select(schema.names).cast(schema)
            lengths = _check_batch(batch, t, tally)
            sizes = t.layout.record_sizes(lengths)
            tally.users += batch.num_rows
            tally.empty += int((lengths == 0).sum())
            tally.behaviours += int(lengths.sum())
            tally.record_bytes += int(sizes.sum())
            tally.map_total += map_bytes(sizes)
            for name, rows in part_rows(t.layout, lengths).items():
                tally.part_rows[name] = tally.part_rows.get(name, 0) + rows
            writer.write_batch(batch)
    return tally


def _replace(tmp: Path, final: Path) -> None:
    """Move a finished attempt's output into place, replacing an earlier attempt's."""
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


def build_shard(batches: Iterable[pa.RecordBatch], schema: pa.Schema, t: ShardTarget, attempt: str = "0") -> dict:
    """Build shard ``t.index`` from ``batches`` (the shard's rows sorted by user id, columns of ``schema``, which
    holds the prefill columns and may hold more, e.g. ``history_fp``); its entry in the version manifest's
    ``shards.list``. Raises StoreBuildError / RecordError naming the user; leaves nothing behind on failure."""
    t0 = time.perf_counter()
    shard_dir = t.staging / SHARDS_DIR / t.name
    part = t.staging / PARQUET_DIR / f"part-{t.name}.parquet"
    tmp_dir = t.staging / SHARDS_DIR / f".{t.name}.tmp-{attempt}-{os.getpid()}"
    tmp_part = part.with_name(f".{part.name}.tmp-{attempt}-{os.getpid()}")
    for d in (tmp_dir / "lmdb", part.parent):
        d.mkdir(parents=True, exist_ok=True)
    try:
        tally = _write_parquet(batches, schema, tmp_part, t)
        digest = [records_digest()]

        def items() -> Iterator[tuple[bytes, bytes]]:
            digest[0] = records_digest()  # a retry after MapFullError starts again
            for uid, rec in iter_file_records(tmp_part, t.layout, 4096):
                key = user_key(uid)
                digest_update(digest[0], key, rec)
                yield key, rec

        map_size, retries = load_sorted(tmp_dir / "lmdb", items, tally.users, map_size_for(tally.map_total))
        data = (tmp_dir / "lmdb" / "data.mdb").stat()
        entry = {
            "index": t.index, "path": f"{SHARDS_DIR}/{t.name}", "parquet": part.name, "users": tally.users,
            "empty_users": tally.empty, "behaviours": tally.behaviours, "record_bytes": tally.record_bytes,
            "payload_bytes": tally.record_bytes - HEADER_SIZE * tally.users, "file_bytes": data.st_size,
            "disk_bytes": data.st_blocks * 512, "map_size": map_size, "map_retries": retries,
            "parquet_bytes": tmp_part.stat().st_size, "checksum": f"blake2b-128:{digest[0].hexdigest()}",
            "part_rows": tally.part_rows,
            "seconds": round(time.perf_counter() - t0, 3),
        }  # fmt: skip
        write_layout(tmp_dir / "layout.json", t.layout)
        _write_shard_manifest(tmp_dir, t, entry)
        _replace(tmp_dir, shard_dir)
        os.replace(tmp_part, part)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_part.unlink(missing_ok=True)
        raise
    return entry


def _write_shard_manifest(shard_dir: Path, t: ShardTarget, entry: dict) -> None:
    """The shard's own manifest: what :class:`cachestore.store.reader.StoreReader` and the store checks read."""
    stats = {k: entry[k] for k in ("users", "behaviours", "record_bytes", "payload_bytes", "file_bytes",
                                   "disk_bytes", "map_size", "map_retries")}
    write_json_synced(shard_dir / "manifest.json", {
        "manifest_version": MANIFEST_VERSION, "version_id": t.staging.name,
        "record_format_version": t.layout.record_format, "layout": t.layout.to_dict(),
        "shard": {"version_id": t.staging.name, "index": t.index, "count": t.count, "function": SHARD_FUNCTION,
                  "checksum": entry["checksum"]},
        "stats": {**stats, "empty_users": entry["empty_users"], "sorted_input": True},
        "lmdb": lmdb_facts(shard_dir / "lmdb"),
    })
