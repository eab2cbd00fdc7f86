"""Hot swap: serve ``STORE/current`` and follow it.

A :class:`ServedVersion` is one published store version with the checkpoint published inside it
(``ckv refresh`` publishes both together: ``versions/<id>/lmdb`` + ``versions/<id>/checkpoint``), loaded
into one :class:`cachestore.decode.runtime.DecodeRuntime` — model, pools and records always come from the same
version directory (``DecodeRuntime.open(version_dir)``), so no request is ever scored with one
version's model and another's records.

:class:`VersionManager` loads the first version when it starts (a failure there is the caller's error),
then a watcher thread reads ``STORE/current`` every ``poll_s`` seconds; a new version is loaded and
warmed in that thread while the old one keeps serving, and handed over as *pending*. The batcher's
worker calls :meth:`VersionManager.switch` between device batches: the pending version becomes the
active one and the old one is closed (its reader released, its runtime dropped) — every request of a
batch is scored by one version, and a batch already running finishes on the version it started with.
A version that fails to load (damaged records, a checkpoint that does not fit, a missing file) leaves
the active one serving; it is counted (``ckv_failed_swaps_total``), logged, kept in ``last_error`` and
not retried until ``STORE/current`` names another version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.decode.sharded import ShardSetRuntime, open_runtime
from collectivekv.cachestore.serving.metrics import ServerMetrics
from collectivekv.cachestore.store.publish import open_current
from collectivekv.cachestore.store.shards import shard_of
from collectivekv.cachestore.store.user_keys import INT, read_key_scheme

log = logging.getLogger("ckv.serve")


@dataclass
class ServedVersion:
    """One loaded version: ``store_version`` (the version directory's name), ``model_version`` (the
    checkpoint's, equal to the records'), the runtime that scores with both, the item count, and how the
    store keys raw user ids (its manifest's ``user_key``: cachestore/store/user_keys.py)."""

    store_version: str
    model_version: str
    runtime: DecodeRuntime | ShardSetRuntime
    n_items: int
    user_key: str = INT

    @property
    def shards(self) -> dict | None:
        """``{"count": N, "served": [...]}`` for a sharded version (routers read it from ``/healthz``), else None."""
        if isinstance(self.runtime, ShardSetRuntime):
            return {"count": self.runtime.count, "served": list(self.runtime.served)}
        return None

    def check_owned(self, user_ids: np.ndarray) -> None:
        """WrongShardError (cachestore/store/shards.py) for a user of a shard this process does not serve."""
        if isinstance(self.runtime, ShardSetRuntime):
            self.runtime.check_owned(user_ids)

    def close(self) -> None:
        """Release the version's device memory (tier, graphs), map registration and LMDB reader."""
        self.runtime.close()


def load_version(version_dir: Path, config: ServingConfig, widths: Sequence[int] = ()) -> ServedVersion:
    """Open a version directory's store and checkpoint as one runtime and warm it: one scored request of
    one candidate and one of each candidate width in ``widths`` (those the version it replaces has served:
    ``candidate_widths()``), so first-use allocations, compiles and graph captures happen here, not in a
    client's request after the switch; the resident tier, when configured, is filled while the runtime
    opens."""
    runtime = open_runtime(version_dir, config=config)
    try:  # a version that fails after its runtime opened gives that runtime back (maps, device memory, graphs)
        warm = np.zeros(1, dtype=np.int64)  # a user of every served shard (the users need not exist): each
        if isinstance(runtime, ShardSetRuntime):  # shard's LMDB is open before the switch, not at first use
            warm = np.concatenate([_user_of(k, runtime.count) for k in runtime.served])
        for width in sorted({1, *widths}):
            runtime.score(warm, np.ones((len(warm), width), dtype=np.int64))
        return ServedVersion(version_dir.name, runtime.model_version, runtime, runtime.resident.cfg.n_items,
                             read_key_scheme(version_dir))
    except BaseException:
        runtime.close()
        raise


def _user_of(shard: int, count: int) -> np.ndarray:
    """One user id that ``shard`` of ``count`` owns (for the warm-up request)."""
    ids = np.arange(64 * count, dtype=np.int64)
    return ids[shard_of(ids, count) == shard][:1]


Loader = Callable[[Path], ServedVersion]


class VersionManager:
    """The active version, a pending one, and the watcher that loads new ones (module docstring)."""

    def __init__(self, store: Path, metrics: ServerMetrics, *, poll_s: float = 1.0,
                 loader: Loader | None = None, runtime: ServingConfig | None = None) -> None:
        self.store = Path(store)
        self.metrics = metrics
        self.poll_s = poll_s
        config = runtime or ServingConfig()
        self._load = loader or (lambda d: load_version(d, config, self._widths()))
        self._subset = config.shards is not None  # started for some shards: a new shard count is not followed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._seen: str | None = None  # the last version name read from STORE/current
        self.active: ServedVersion | None = None
        self._pending: ServedVersion | None = None
        self.swaps = 0
        self.failed_swaps = 0
        self.last_error: str | None = None

    def start(self) -> ServedVersion:
        """Load the current version (errors propagate: nothing to serve) and start the watcher."""
        version_dir = open_current(self.store)
        self._seen = version_dir.name
        self.active = self._load(version_dir)
        self.metrics.serving(self.active.store_version, self.active.model_version)
        log.info("serving store version %s (model %s)", self.active.store_version, self.active.model_version)
        self._watcher = threading.Thread(target=self._watch, name="ckv-versions", daemon=True)
        self._watcher.start()
        return self.active

    def _widths(self) -> list[int]:
        """The candidate widths the active version has served (the next one warms them)."""
        active = self.active
        return active.runtime.candidate_widths() if active is not None else []

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def check(self) -> bool:
        """Read STORE/current once; load a version not seen before. True when one became pending."""
        try:
            version_dir = open_current(self.store)
        except (OSError, RuntimeError) as exc:
            log.warning("cannot read %s/current (still serving %s): %s", self.store, self._seen, exc)
            return False
        if version_dir.name == self._seen:
            return False
        self._seen = version_dir.name
        t0 = time.perf_counter()
        try:
            loaded = self._load(version_dir)
        except Exception as exc:  # any failure to load: keep serving the active version
            self._failed(version_dir.name, f"{type(exc).__name__}: {exc}")
            return False
        moved = self._shard_count_change(loaded)
        if moved is not None:
            loaded.close()
            self._failed(version_dir.name, moved)
            return False
        with self._lock:
            superseded, self._pending = self._pending, loaded
        if superseded is not None:
            superseded.close()
        log.info("store version %s loaded in %.2f s, switching at the next batch", loaded.store_version,
                 time.perf_counter() - t0)
        return True

    def _failed(self, name: str, why: str) -> None:
        """Count and log a version that will not be served (the active one stays)."""
        self.failed_swaps += 1
        self.metrics.failed_swaps.inc()
        self.last_error = f"version {name}: {why}"
        log.error("store version %s failed to load, still serving %s: %s", name,
                  self.active.store_version if self.active else None, self.last_error)

    def _shard_count_change(self, loaded: ServedVersion) -> str | None:
        """Why a process serving some shards does not follow ``loaded`` (another shard count: the fleet's routing
        changes, so its servers restart with their new ``--shards``), None when it may."""
        def count(v: ServedVersion | None) -> int:
            return 1 if v is None or v.shards is None else v.shards["count"]

        if not self._subset or self.active is None or count(loaded) == count(self.active):
            return None
        return (f"its shard count {count(loaded)} differs from the served version's {count(self.active)}: restart "
                "this fleet's servers with their new --shards")

    def switch(self) -> ServedVersion:
        """The version the next batch is scored with: a pending version replaces the active one here
        (called by the batcher's worker between batches; the old version is closed and dropped)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            assert self.active is not None, "VersionManager.start() was not called"
            return self.active
        old, self.active = self.active, pending
        self.swaps += 1
        self.metrics.swaps.inc()
        self.metrics.serving(pending.store_version, pending.model_version)
        log.info("switched from store version %s to %s", old.store_version if old else None, pending.store_version)
        if old is not None:  # freed by reference count here (no gc pass: a full collection stalls the worker)
            old.close()
        return pending

    def close(self) -> None:
        """Stop the watcher and release every loaded version."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            pending, self._pending = self._pending, None
        for version in (pending, self.active):
            if version is not None:
                version.close()
        self.active = None

