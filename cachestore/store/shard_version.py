"""A sharded store version as a whole: its manifest from the shards' entries, and the checks over every shard.

Layout and shard function: :mod:`cachestore.store.shards`. The shards are built in parallel
(:mod:`cachestore.store.shard_build`); the process that publishes only sums their entries into the version's
manifest here and renames the version into place (:func:`cachestore.store.publish.publish`): no per-user work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.publish import MANIFEST_VERSION
from collectivekv.cachestore.store.shards import SHARD_FUNCTION, ShardError, ShardSet
from collectivekv.cachestore.store.store_check import LmdbMeta, StoreDamagedError, check_version, version_manifest

_SUMMED = ("users", "empty_users", "behaviours", "payload_bytes", "record_bytes", "file_bytes", "disk_bytes",
           "map_size", "map_retries")


def sharded_manifest(staging: Path, layout: EntryLayout, entries: list[dict], count: int,
                     parquet_files: list[dict]) -> dict:
    """The manifest of a sharded staging version from its ``count`` shard entries (any order)."""
    entries = sorted(entries, key=lambda e: e["index"])
    if [e["index"] for e in entries] != list(range(count)):
        raise ShardError(f"{staging}: shard entries {[e['index'] for e in entries]} are not 0..{count - 1}")
    stats: dict = {k: sum(int(e[k]) for e in entries) for k in _SUMMED}
    stats["part_rows"] = {p.name: sum(e["part_rows"][p.name] for e in entries) for p in layout.parts}
    stats.update(sorted_input=True, seconds=max(e["seconds"] for e in entries))
    return {
        "manifest_version": MANIFEST_VERSION,
        "version_id": staging.name,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "record_format_version": layout.record_format,
        "layout": layout.to_dict(),
        "stats": stats,
        "parquet": {"mode": "shards", "source": str(staging.resolve()), "files": parquet_files},
        "shards": {"count": count, "function": SHARD_FUNCTION, "list": entries},
    }


def version_shards(version_dir: str | os.PathLike) -> ShardSet | None:
    """The shards of a version directory (None: an unsharded version)."""
    vdir = Path(version_dir)
    return ShardSet.of(vdir, version_manifest(vdir))


def check_store_version(version_dir: str | os.PathLike) -> list[LmdbMeta]:
    """The cheap file check (:func:`cachestore.store.store_check.check_version`) of the version's LMDB, or of
    every shard's; each shard's manifest must name this version and its own index."""
    vdir = Path(version_dir)
    shards = version_shards(vdir)
    if shards is None:
        return [check_version(vdir)]
    metas = []
    for k in range(shards.count):
        check_shard_identity(shards, k)
        metas.append(check_version(shards.dir(k)))
    return metas


def check_shard_identity(shards: ShardSet, k: int) -> None:
    """StoreDamagedError unless the folder listed as shard ``k`` says it is shard k of this version (two shard
    folders swapped would serve every user of one as a cold start)."""
    vdir = shards.version_dir
    own = version_manifest(shards.dir(k)).get("shard") or {}
    if own.get("index") != k or own.get("count") != shards.count or own.get("version_id") != vdir.name:
        raise StoreDamagedError(vdir, f"{shards.entries[k]['path']}/manifest.json names shard "
                                f"{own.get('index')} of {own.get('count')} of version {own.get('version_id')}, "
                                f"not shard {k} of {shards.count} of {vdir.name}")
