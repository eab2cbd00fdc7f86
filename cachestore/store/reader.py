"""Read user records from one published store version (see publish.py for the directory layout).

StoreReader(version_dir) pins one immutable version: the path is resolved (realpath) and
layout.json read at construction, so a later switch of STORE/current never changes what an
existing reader sees. The LMDB environment is opened lazily, read-only, lock=False (nothing ever
writes a published version), readahead=False (random point reads), and reopened when os.getpid()
changed: an Environment must not cross fork(), so a reader built in a parent process and used in
DataLoader / Spark worker children opens its own environment in each child. Readers of the same
version in one process share one Environment (py-lmdb forbids opening it twice).

Values returned by get/get_many are decoded :class:`cachestore.store.entry.EntryRecord`s
(:func:`cachestore.store.entry.decode_entry`, checked against the store's layout) whose numpy arrays view a private
bytes copy
of the LMDB value (one copy out of the map; valid after the transaction ends). Every record is
CRC-checked and must carry the layout's model_version. The LMDB file is checked before it is mapped
(:func:`cachestore.store.store_check.check_version`: size against the manifest, both meta pages), and any
``lmdb.Error`` while reading becomes a :class:`cachestore.store.store_check.StoreDamagedError` naming the
version and the user.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from collectivekv.cachestore.store.entry import EntryLayout, EntryRecord, check_indices, decode_entry, read_layout
from collectivekv.cachestore.store.publish import LAYOUT, LMDB_DIR, open_current
from collectivekv.cachestore.store.record import key_user, user_key
from collectivekv.cachestore.store.shards import SHARDS_DIR
from collectivekv.cachestore.store.store_check import StoreDamagedError, check_version, version_manifest

# py-lmdb refuses to open the same environment twice in one process, so readers of one version
# share an Environment: path -> [env, number of readers], valid for the process _SHARED_PID.
_SHARED: dict[str, list] = {}
_SHARED_PID = os.getpid()
_SHARED_LOCK = threading.Lock()


def _acquire(path: str, max_readers: int) -> lmdb.Environment:
    global _SHARED_PID
    with _SHARED_LOCK:
        if os.getpid() != _SHARED_PID:
            # Inherited over fork(): never used here, only closed. readonly + lock=False: these hold
            # no reader slot or file lock, so closing them in the child cannot disturb the parent.
            for env, _ in _SHARED.values():
                env.close()
            _SHARED.clear()
            _SHARED_PID = os.getpid()
        entry = _SHARED.get(path)
        if entry is None:
            env = lmdb.open(path, subdir=True, readonly=True, lock=False, readahead=False,
                            max_readers=max_readers, max_dbs=0)
            entry = _SHARED[path] = [env, 0]
        entry[1] += 1
        return entry[0]


def _release(path: str) -> None:
    with _SHARED_LOCK:
        entry = _SHARED.get(path)
        if entry is not None and os.getpid() == _SHARED_PID:
            entry[1] -= 1
            if entry[1] <= 0:
                entry[0].close()
                del _SHARED[path]


class StoreReader:
    """Point and batched reads of one store version; safe to construct before fork()."""

    def __init__(self, version_dir: str | os.PathLike, *, max_readers: int = 1024) -> None:
        self._dir = Path(os.path.realpath(version_dir))
        self._layout = read_layout(self._dir / LAYOUT)
        manifest = version_manifest(self._dir)
        if not (self._dir / LMDB_DIR / "data.mdb").is_file():
            if manifest.get("shards"):
                raise FileNotFoundError(f"{self._dir} is a sharded version ({manifest['shards'].get('count')} shards): "
                                        f"read one shard (StoreReader of {self._dir}/{SHARDS_DIR}/<k>) or serve it "
                                        "with cachestore.decode.sharded.open_runtime")
            raise FileNotFoundError(f"{self._dir} holds no {LMDB_DIR}/data.mdb")
        check_version(self._dir)  # before anything maps the file: StoreDamagedError, never SIGBUS
        shard = manifest.get("shard") or {}
        self._version_id = str(shard.get("version_id") or self._dir.name)
        # (index, count) of a shard of a sharded version, None for a whole version
        self.shard: tuple[int, int] | None = (int(shard["index"]), int(shard["count"])) if shard else None
        self._max_readers = max_readers
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None

    @classmethod
    def open_current(cls, store_root: str | os.PathLike, **kwargs: int) -> StoreReader:
        """A reader of the version STORE/current points to now (resolved once)."""
        return cls(open_current(store_root), **kwargs)

    @property
    def layout(self) -> EntryLayout:
        return self._layout

    @property
    def version_dir(self) -> Path:
        return self._dir

    @property
    def version_id(self) -> str:
        """The store version's id (for a shard: the whole version's, not the shard directory's name)."""
        return self._version_id

    def _environment(self) -> lmdb.Environment:
        pid = os.getpid()
        if self._env is None or self._pid != pid:
            if not self._dir.is_dir():  # pruned by later publishes (publish keeps the current and previous one)
                raise FileNotFoundError(f"store version {self._dir} is no longer published (two newer versions "
                                        "were published since this reader resolved it): open STORE/current again")
            try:
                self._env = _acquire(str(self._dir / LMDB_DIR), self._max_readers)
            except lmdb.Error as exc:
                raise self.damaged(exc) from None
            self._pid = pid
        return self._env

    def damaged(self, exc: BaseException, user_ids: Iterable[int] = ()) -> StoreDamagedError:
        """The :class:`StoreDamagedError` for an ``lmdb.Error`` raised while reading ``user_ids``: names the
        first of them whose own read fails (one read transaction each), or none when that is not known."""
        culprit = None
        for uid in user_ids:
            try:
                with self._environment().begin(buffers=True) as txn:
                    txn.get(user_key(int(uid)))
            except lmdb.Error:
                culprit = int(uid)
                break
            except StoreDamagedError:
                break
        return StoreDamagedError(self._dir, f"LMDB: {exc}", culprit)

    @contextmanager
    def reading(self, user_ids: Iterable[int] = ()) -> Iterator[None]:
        """Turn an ``lmdb.Error`` inside the block (reads of ``user_ids``) into :meth:`damaged`'s error."""
        try:
            yield
        except lmdb.Error as exc:
            raise self.damaged(exc, user_ids) from None

    def _decode(self, user_id: int, raw: bytes | None) -> EntryRecord | None:
        if raw is None:
            return None
        record = decode_entry(self._layout, raw, expected_model_version=self._layout.model_version, user_id=user_id)
        check_indices(self._layout, record, user_id)  # router indices < pool size
        return record

    def get_raw(self, user_id: int) -> bytes | None:
        """The encoded record bytes of a user (undecoded, unverified), or None if absent."""
        with self.reading([user_id]), self._environment().begin(buffers=False) as txn:
            return txn.get(user_key(int(user_id)))

    def get(self, user_id: int) -> EntryRecord | None:
        """The verified record of a user, or None if the user has no cache entry."""
        return self._decode(int(user_id), self.get_raw(user_id))

    def get_many(self, user_ids: Iterable[int]) -> list[EntryRecord | None]:
        """Records for many users (None for absent ones), all from one read transaction."""
        ids = [int(u) for u in user_ids]
        with self.reading(ids), self._environment().begin(buffers=False) as txn:
            raws = [txn.get(user_key(u)) for u in ids]
        return [self._decode(u, raw) for u, raw in zip(ids, raws, strict=True)]

    def iter_users(self) -> Iterator[int]:
        """All user ids in ascending order (one read transaction for the whole iteration)."""
        with self.reading(), self._environment().begin(buffers=True) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                yield key_user(bytes(key))

    def iter_records(self) -> Iterator[tuple[int, EntryRecord]]:
        """(user id, verified record) for every user in ascending id order."""
        with self.reading(), self._environment().begin(buffers=False) as txn:
            for key, raw in txn.cursor():
                uid = key_user(key)
                record = self._decode(uid, raw)
                assert record is not None
                yield uid, record

    def __len__(self) -> int:
        with self.reading():
            return self._environment().stat()["entries"]

    def close(self) -> None:
        """Release this reader's environment (closed when no reader of the version in this
        process uses it any more); a later read reopens it."""
        if self._env is not None and self._pid == os.getpid():
            _release(str(self._dir / LMDB_DIR))
        self._env = None
        self._pid = None

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Picklable for worker processes (DataLoader spawn): the environment never travels."""
        state = self.__dict__.copy()
        state["_env"] = None
        state["_pid"] = None
        return state
