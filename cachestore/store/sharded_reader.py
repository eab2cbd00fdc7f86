"""Reading a sharded store version as one: :class:`ShardedReader` routes each user to its shard's
:class:`cachestore.store.reader.StoreReader`; :func:`open_reader` opens any version, sharded or not; and
:func:`check_shards` is the deep check of every shard (``ckv store verify``).

Serving does not use :class:`ShardedReader`: it opens one :class:`StoreReader` per shard
(:mod:`cachestore.decode.sharded`). Readers of the record contents (verify, reports, tools) use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from collectivekv.cachestore.store.entry import EntryLayout, EntryRecord
from collectivekv.cachestore.store.publish import CURRENT, MANIFEST, open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import key_user
from collectivekv.cachestore.store.shard_version import version_shards
from collectivekv.cachestore.store.shards import (
    ShardSet,
    check_owned,
    digest_update,
    records_digest,
    shard_of,
)
from collectivekv.cachestore.store.store_tree import check_tree


class ShardedReader:
    """Point and batched reads over the opened shards of one sharded version (the :class:`StoreReader` methods
    that do not depend on one LMDB file). ``version_dir`` / ``version_id``: the whole version's."""

    def __init__(self, shards: ShardSet, selected: Sequence[int] | None = None) -> None:
        self.shards = shards
        self.readers = {k: StoreReader(shards.dir(k)) for k in shards.select(selected)}
        self._layout = next(iter(self.readers.values())).layout

    @property
    def layout(self) -> EntryLayout:
        return self._layout

    @property
    def version_dir(self) -> Path:
        return self.shards.version_dir

    @property
    def version_id(self) -> str:
        return self.shards.version_dir.name

    def _owners(self, ids: list[int]) -> np.ndarray:
        return check_owned(np.asarray(ids, dtype=np.int64), self.shards.count, tuple(self.readers))

    def get_raw(self, user_id: int) -> bytes | None:
        return self.readers[int(self._owners([int(user_id)])[0])].get_raw(user_id)

    def get(self, user_id: int) -> EntryRecord | None:
        return self.readers[int(self._owners([int(user_id)])[0])].get(user_id)

    def get_many(self, user_ids: Iterable[int]) -> list[EntryRecord | None]:
        """Records in the order asked (None for absent users), one read transaction per shard."""
        ids = [int(u) for u in user_ids]
        owners = self._owners(ids) if ids else np.zeros(0, dtype=np.int64)
        out: list[EntryRecord | None] = [None] * len(ids)
        for k, reader in self.readers.items():
            rows = np.flatnonzero(owners == k).tolist()
            for i, rec in zip(rows, reader.get_many([ids[i] for i in rows]), strict=True):
                out[i] = rec
        return out

    def iter_users(self) -> Iterator[int]:
        """Every user id, shard by shard (ascending within a shard)."""
        for reader in self.readers.values():
            yield from reader.iter_users()

    def __len__(self) -> int:
        return sum(len(r) for r in self.readers.values())

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(store: str | os.PathLike, shards: Sequence[int] | None = None) -> StoreReader | ShardedReader:
    """A reader of a store root's ``current`` version (resolved once) or of a version directory (one with a
    manifest); anything else is refused as not a store root."""
    root = Path(store)
    vdir = root if (root / MANIFEST).is_file() and not os.path.lexists(root / CURRENT) else open_current(root)
    found = version_shards(vdir)
    return StoreReader(vdir) if found is None else ShardedReader(found, shards)


def _foreign(ids: list[int], count: int, k: int) -> int | None:
    """The first of ``ids`` that shard ``k`` does not own, or None."""
    bad = np.flatnonzero(shard_of(np.asarray(ids, dtype=np.int64), count) != k)
    return ids[int(bad[0])] if bad.size else None


def check_shards(reader: ShardedReader) -> list[str]:
    """The deep check of every opened shard: its B-tree (:func:`check_tree`), its users all its own (so no user is
    in two shards), its user count and its records' digest as the version manifest lists them. Problems found
    (empty: all good); a damaged file raises StoreDamagedError."""
    problems: list[str] = []
    count = reader.shards.count
    for k, shard in reader.readers.items():
        entry = reader.shards.entries[k]
        check_tree(shard.version_dir)
        digest, users, foreign, ids = records_digest(), 0, None, []
        env = shard._environment()
        with shard.reading(), env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                key = bytes(key)
                digest_update(digest, key, bytes(value))
                ids.append(key_user(key))
                if len(ids) == 1 << 16:
                    users, foreign, ids = users + len(ids), foreign or _foreign(ids, count, k), []
        users, foreign = users + len(ids), foreign or _foreign(ids, count, k)
        if foreign is not None:
            problems.append(f"shard {k}: user {foreign} belongs to shard {int(shard_of([foreign], count)[0])}")
        if users != entry["users"]:
            problems.append(f"shard {k}: {users} users, the manifest lists {entry['users']}")
        if f"blake2b-128:{digest.hexdigest()}" != entry["checksum"]:
            problems.append(f"shard {k}: the records' digest is blake2b-128:{digest.hexdigest()}, the "
                            f"manifest lists {entry['checksum']} (a record was changed after the publish)")
    return problems
