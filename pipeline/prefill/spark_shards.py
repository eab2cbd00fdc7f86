"""The prefill job's sharded output (``--shards N``, N > 1): the shards are built by Spark tasks, in parallel.

After the prefill's ``mapInArrow`` (and the union with carried-over rows of an incremental run)::

    rows.repartition(N, "user_id")          # partition k = pmod(murmur3(user_id, 42), N) = shard k
        .sortWithinPartitions("user_id")
        .mapInArrow(build_shard_partition)   # task k writes parquet/part-<k>.parquet + shards/<k>/ of the
                                             # staging version (cachestore.store.shard_build), yields one row
        .collect()                           # N rows: each shard's entry (users, bytes, checksum)

The driver then only sums the N entries into the manifest and publishes
(:func:`pipeline.store.store_ops.publish_sharded`); it holds no per-user state. Each task checks that every
row it got belongs to its shard (the shard function of :mod:`cachestore.store.shards` is Spark's hash
partitioning), so a Spark that partitioned otherwise fails the job.

The staging version lives under ``STORE/staging/``: executors write there, so ``STORE`` must be a filesystem
every executor mounts at the same path (local mode; NFS / a shared volume on a cluster).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from collectivekv.cachestore.store.entry import EntryLayout, layout_from_dict
from collectivekv.cachestore.store.shard_build import ShardTarget, build_shard, shard_schema

log = logging.getLogger("ckv.prefill")
ENTRY_DDL = "entry string"


def build_shard_partition(batches: Any, params: dict) -> Any:
    """mapInArrow body of the last stage: build the shard whose index is this task's partition id."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    target = ShardTarget(Path(params["staging"]), ctx.partitionId(), params["count"],
                         layout_from_dict(params["layout"]), params["compression"])
    entry = build_shard(batches, shard_schema(), target, attempt=str(ctx.taskAttemptId()))
    print(f"[ckv prefill] shard {target.index}/{target.count}: {entry['users']} users, "
          f"{entry['file_bytes'] / 1e6:.1f} MB LMDB in {entry['seconds']:.1f} s", flush=True)
    yield pa.RecordBatch.from_pydict({"entry": [json.dumps(entry)]})


def build_shards(out: Any, staging: Path, layout: EntryLayout, count: int, compression: str) -> list[dict]:
    """Run the shard stage over the prefill rows ``out`` (a DataFrame with :func:`shard_schema`'s columns);
    the N shard entries. A shard whose partition Spark did not run (no rows) is built empty here."""
    params = {"staging": str(staging), "count": count, "layout": layout.to_dict(), "compression": compression}
    cols = shard_schema().names
    rows = (out.select(*cols).repartition(count, "user_id").sortWithinPartitions("user_id")
            .mapInArrow(functools.partial(build_shard_partition, params=params), ENTRY_DDL).collect())
    entries = {e["index"]: e for e in (json.loads(r.entry) for r in rows)}
    for k in sorted(set(range(count)) - set(entries)):
        entries[k] = build_shard(iter(()), shard_schema(), ShardTarget(staging, k, count, layout, compression))
    return [entries[k] for k in range(count)]
