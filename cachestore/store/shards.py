"""Sharded stores: which shard owns a user, and where a version keeps its shards.

**The shard function** (one source of truth, the same for the Spark job, routers and readers)::

    shard(user_id, N) = pmod(murmur3_x86_32(user_id as a 64-bit long, seed 42), N)

which is Spark SQL's ``pmod(hash(user_id), N)`` for a BIGINT column, and the partition Spark's
``DataFrame.repartition(N, "user_id")`` sends the row to (hash partitioning: ``pmod(murmur3(cols, 42), N)``).
The prefill job relies on that equality and checks it on every row it stores
(:mod:`cachestore.store.shard_build`): a Spark that partitioned differently fails the job, it never publishes a
user into the wrong shard. ``user_id`` is the store's key (an integer id, or the 63-bit key of a text id:
:mod:`cachestore.store.user_keys`). A router in another language reproduces it with any Murmur3 x86_32
(``hashLong``: the low then the high 32-bit word, each mixed as one block, finalised with length 8).
Python's ``hash()`` is never used (salted per process).

**Layout of a sharded version** (``N > 1``; ``N = 1`` is the unsharded layout of :mod:`cachestore.store.publish`)::

    versions/<id>/manifest.json       the version's manifest, with a "shards" block (below), no "lmdb" block
    versions/<id>/layout.json
    versions/<id>/parquet/            part-<k>.parquet per shard + _layout.json (+ _prefill.json)
    versions/<id>/shards/<k>/         one version-like directory per shard, k = 00000, 00001, ...:
        lmdb/data.mdb                 the shard's users, the same records an unsharded store holds
        layout.json, manifest.json    the shard's own manifest: stats, "lmdb" facts, "shard" = {version_id,
                                      index, count}, so :class:`cachestore.store.reader.StoreReader` opens it
                                      as it opens a version

The version manifest's ``shards`` block: ``{"count": N, "function": SHARD_FUNCTION, "list": [{"index", "path",
"users", "behaviours", "record_bytes", "payload_bytes", "file_bytes", "disk_bytes", "checksum"}, ...]}``;
``checksum`` is :func:`records_digest` over the shard's (key, record) pairs in key order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_FUNCTION = "spark-murmur3-x86_32-seed42-pmod"
SHARDS_DIR = "shards"
SEED = 42
_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)
_M5, _N = np.uint32(5), np.uint32(0xE6546B64)
_F1, _F2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


class ShardError(ValueError):
    """A shard selection or a sharded version that does not fit (bad index, missing shard, ...)."""


class WrongShardError(KeyError):
    """A user this process does not serve: ``owner`` is the shard that holds it."""

    def __init__(self, user_id: int, owner: int, count: int, served: Sequence[int], position: int | None = None):
        self.user_id, self.owner, self.count, self.position = user_id, owner, count, position
        self.served = tuple(served)
        where = f"user_ids[{position}] " if position is not None else ""
        super().__init__(f"{where}user {user_id} belongs to shard {owner} of {count}; this process serves shard(s) "
                         f"{','.join(map(str, self.served))}: send it to shard {owner}'s server")

    def __str__(self) -> str:
        return str(self.args[0])


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _mix(h1: np.ndarray, k1: np.ndarray) -> np.ndarray:
    k1 = _rotl(k1 * _C1, 15) * _C2
    return _rotl(h1 ^ k1, 13) * _M5 + _N


def murmur3_long(values: np.ndarray | Iterable[int], seed: int = SEED) -> np.ndarray:
    """Spark's ``Murmur3_x86_32.hashLong`` of each int64 value (int32 results: what SQL ``hash()`` returns)."""
    v = np.ascontiguousarray(np.asarray(values, dtype=np.int64)).view(np.uint64)
    low = (v & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    high = (v >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = _mix(np.full(v.shape, seed, dtype=np.uint32), low)
        h = _mix(h, high) ^ np.uint32(8)
        h ^= h >> np.uint32(16)
        h *= _F1
        h ^= h >> np.uint32(13)
        h *= _F2
        h ^= h >> np.uint32(16)
    return h.view(np.int32)


def shard_of(user_ids: np.ndarray | Iterable[int], count: int) -> np.ndarray:
    """The owning shard (int64, 0..count-1) of each user id: ``pmod(murmur3(id, 42), count)``."""
    if count < 1:
        raise ShardError(f"shard count must be >= 1, got {count}")
    return np.mod(murmur3_long(user_ids).astype(np.int64), count)


def shard_name(index: int) -> str:
    """A shard's directory name under ``shards/`` (and its Parquet part's suffix)."""
    return f"{index:05d}"


def records_digest() -> hashlib._Hash:  # type: ignore[name-defined]
    """The running digest of a shard: ``update(key + len(record) as 4 bytes LE + record)`` per user in key order."""
    return hashlib.blake2b(digest_size=16)


def digest_update(h: hashlib._Hash, key: bytes, record: bytes) -> None:  # type: ignore[name-defined]
    h.update(key)
    h.update(len(record).to_bytes(4, "little"))
    h.update(record)


@dataclass(frozen=True)
class ShardSet:
    """What a sharded version holds (from its manifest) and which of its shards a process opens."""

    version_dir: Path
    count: int
    entries: tuple[dict, ...]  # the manifest's shards.list

    @classmethod
    def of(cls, version_dir: str | os.PathLike, manifest: dict) -> ShardSet | None:
        """The version's shards, or None for an unsharded version."""
        block = manifest.get("shards")
        if not block:
            return None
        if block.get("function") != SHARD_FUNCTION:
            raise ShardError(f"{version_dir}: shard function {block.get('function')!r} is not {SHARD_FUNCTION!r}")
        try:
            count, entries = int(block["count"]), tuple(block["list"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{version_dir}: manifest's shards block has no valid count and list ({exc!r})") from None
        paths = [e.get("path") if isinstance(e, dict) else None for e in entries]
        names = {f"{SHARDS_DIR}/{shard_name(k)}" for k in range(count)}
        if len(paths) != count or set(paths) != names:  # only the version's own shard folders are ever opened
            raise ShardError(f"{version_dir}: the manifest lists shard folders {paths[:4]} for {count} shards, not "
                             f"{SHARDS_DIR}/{shard_name(0)} .. {SHARDS_DIR}/{shard_name(count - 1)}: the version is "
                             "damaged (republish it)")
        return cls(Path(version_dir), count, entries)

    def dir(self, index: int) -> Path:
        return self.version_dir / self.entries[index]["path"]

    def select(self, wanted: Sequence[int] | None) -> tuple[int, ...]:
        """The shard indices to open (None: all), checked against the count."""
        if wanted is None:
            return tuple(range(self.count))
        bad = [k for k in wanted if not 0 <= k < self.count]
        if bad:
            raise ShardError(f"{self.version_dir}: shard {bad[0]} does not exist (the version has {self.count} "
                             f"shards, 0..{self.count - 1})")
        return tuple(sorted(set(wanted)))


def parse_shards(text: str | None) -> tuple[int, ...] | None:
    """``"0,3"`` / ``"0-3"`` / ``"all"`` / None → shard indices (None: all)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ShardError(f"--shards {text!r}: expected indices like 0,3 or 0-3") from None
        if a < 0 or b < a:
            raise ShardError(f"--shards {text!r}: bad range {part.strip()!r}")
        out.extend(range(a, b + 1))
    return tuple(sorted(set(out)))


def check_owned(user_ids: np.ndarray, count: int, served: Sequence[int]) -> np.ndarray:
    """The owning shard of each of ``user_ids`` (:func:`shard_of`); WrongShardError for the first user that no
    served shard owns."""
    owners = shard_of(user_ids, count)
    bad = ~np.isin(owners, np.asarray(served, dtype=np.int64))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise WrongShardError(int(user_ids[i]), int(owners[i]), count, served, i)
    return owners
