"""``ckv store build --shards N``: a sharded store version from prefill Parquet, in one process.

The nightly prefill builds the shards inside its Spark stage (:mod:`pipeline.prefill.spark_shards`); this is the
same build without Spark, for rebuilding a store from its Parquet (or re-sharding it): for each shard k, the
Parquet files are streamed once, the rows of shard k kept (:func:`cachestore.store.shards.shard_of`), sorted by
user id and handed to :func:`cachestore.store.shard_build.build_shard`; then one publish switches all shards.
Memory: one shard's rows at a time.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collectivekv.cachestore.store.entry import read_layout
from collectivekv.cachestore.store.lmdb_build import (
    PARQUET_LAYOUT_FILE,
    StoreBuildError,
    check_part_schema,
    check_record_format,
    list_parquet_files,
)
from collectivekv.cachestore.store.publish import new_staging_dir
from collectivekv.cachestore.store.shard_build import HISTORY_FP, ShardTarget, build_shard, shard_schema
from collectivekv.cachestore.store.shards import shard_of
from collectivekv.pipeline.store.store_ops import publish_sharded, read_prefill_meta

log = logging.getLogger("ckv.store")


def shard_rows(files: list[Path], schema: pa.Schema, index: int, count: int) -> pa.Table:
    """The rows of shard ``index`` from every file, sorted by user id (``history_fp`` 0 where a file has none).
    StoreBuildError naming the file(s) for a missing column or wrong type, a null user id, or a user in two rows."""
    parts, origin = [], []
    for k, path in enumerate(files):
        table = pq.read_table(path)
        check_part_schema(path, table.schema)
        if table.column("user_id").null_count:
            raise StoreBuildError(f"{path}: null values in column 'user_id'")
        if HISTORY_FP not in table.column_names:
            table = table.append_column(HISTORY_FP, pa.array(np.zeros(table.num_rows, np.int64)))
        mask = shard_of(table.column("user_id").to_numpy(), count) == index
        parts.append(table.select(schema.names).filter(pa.array(mask)).cast(schema))
        origin.append(np.full(int(mask.sum()), k))
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    order = pc.sort_indices(table, [("user_id", "ascending")])
    ids = table.column("user_id").to_numpy()[order.to_numpy()]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if len(dup):
        where = np.concatenate(origin)[order.to_numpy()][dup[0] : dup[0] + 2]
        names = " and ".join(sorted({str(files[k]) for k in where.tolist()}))
        raise StoreBuildError(f"{names}: duplicate user id {int(ids[dup[0]])} (a user must have one row)")
    return table.take(order)


def build_sharded_store(store_root: str | os.PathLike, parquet_dir: str | os.PathLike, count: int, *,
                        command_line: str | None = None, checkpoint: Path | None = None) -> dict[str, Any]:
    """Build a ``count``-shard version of STORE from PARQUET_DIR (part files + _layout.json) and publish it."""
    root, src = Path(store_root), Path(parquet_dir)
    if not (src / PARQUET_LAYOUT_FILE).is_file():
        raise FileNotFoundError(f"{src}: not a prefill Parquet directory (no {PARQUET_LAYOUT_FILE})")
    layout, files, schema = read_layout(src / PARQUET_LAYOUT_FILE), list_parquet_files(src), shard_schema()
    check_record_format(layout, src)
    if not files:
        raise FileNotFoundError(f"{src} holds no Parquet part files (*.parquet): nothing to publish")
    root.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(root)
    entries = []
    try:
        for k in range(count):
            rows = shard_rows(files, schema, k, count).to_batches(max_chunksize=4096)
            entries.append(build_shard(rows, schema, ShardTarget(staging, k, count, layout)))
            log.info("shard %d/%d: %d users", k, count, entries[-1]["users"])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_sharded(root, staging, layout, entries, count, prefill=read_prefill_meta(src),
                           command_line=command_line or shlex.join(sys.argv), checkpoint=checkpoint)
