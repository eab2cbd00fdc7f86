"""Dynamic batching: concurrent requests grouped into device batches, scored by one worker thread.

Like Triton Inference Server's dynamic batcher: :meth:`DynamicBatcher.submit` queues a validated
request (one user and its candidates, or many users) and returns a future. The worker thread — the
only thread that touches the runtime — takes the oldest request, then keeps adding queued requests
(in arrival order) while the batch holds fewer than ``max_batch_users`` users and the oldest has
waited less than ``max_wait_ms``; a request that would overflow the batch starts the next one (a
request larger than ``max_batch_users`` is a batch on its own). The batch is scored in one
``runtime.score`` call by the version :meth:`VersionManager.switch` returns for it, and each
request's rows are handed back through its future.

Back-pressure: at most ``max_queue_users`` users wait; a request beyond that raises :class:`QueueFull`
at once. :meth:`close` refuses new requests (:class:`ShuttingDown`) and, with ``drain``, scores
every queued request before the worker exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

import numpy as np

from collectivekv.cachestore.decode.capture import own_streams
from collectivekv.cachestore.decode.runtime import RuntimeStats
from collectivekv.cachestore.serving.metrics import ServerMetrics
from collectivekv.cachestore.serving.payloads import BadRequest, ScoreReply, ScoreRequest, key_users, to_dense_items
from collectivekv.cachestore.serving.versions import ServedVersion, VersionManager
from collectivekv.cachestore.store.shards import WrongShardError

log = logging.getLogger("ckv.serve")


class QueueFull(RuntimeError):
    """The queue holds max_queue_users users: the client should retry later (HTTP 503)."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new requests (HTTP 503)."""


class _Queued:
    """A queued request, its future and when it was queued (a plain class: one is made per request)."""

    __slots__ = ("request", "future", "enqueued")

    def __init__(self, request: ScoreRequest) -> None:
        self.request = request
        self.future: Future = Future()
        self.enqueued = time.perf_counter()


class DynamicBatcher:
    """The queue and its worker thread (module docstring)."""

    def __init__(self, versions: VersionManager, metrics: ServerMetrics, *, max_batch_users: int = 512,
                 max_wait_ms: float = 2.0, max_queue_users: int = 1 << 16) -> None:
        self.versions = versions
        self.metrics = metrics
        self.max_batch_users = max_batch_users
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue_users = max_queue_users
        self._queue: deque[_Queued] = deque()
        self._queued_users = 0
        self._cond = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None

    @property
    def queued_users(self) -> int:
        return self._queued_users

    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name="ckv-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: ScoreRequest) -> Future:
        """Queue a request; its future resolves to a :class:`ScoreReply` (or raises BadRequest)."""
        item = _Queued(request)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if self._queued_users + request.n_users > self.max_queue_users:
                raise QueueFull(f"{self._queued_users} users are queued (limit {self.max_queue_users})")
            self._queue.append(item)
            self._queued_users += request.n_users  # (the queue_users gauge is set by the worker, per batch)
            self._cond.notify()
        return item.future

    def close(self, drain: bool = True) -> None:
        """Refuse new requests; score the queued ones (drain) or fail them; stop the worker."""
        with self._cond:
            self._closing = True
            if not drain:
                while self._queue:
                    future = self._queue.popleft().future
                    if future.set_running_or_notify_cancel():  # False: the client gave up on it already
                        future.set_exception(ShuttingDown("the server shut down"))
                self._queued_users = 0
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()

    def _take(self) -> list[_Queued] | None:
        """The next batch (module docstring); None when closing and the queue is empty."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait(0.05)
                if not self._queue:
                    return []  # idle: let the worker switch versions
            batch = [self._queue.popleft()]
            users = batch[0].request.n_users
            deadline = batch[0].enqueued + self.max_wait_s
            while users < self.max_batch_users:
                if self._queue:
                    if users + self._queue[0].request.n_users > self.max_batch_users:
                        break
                    batch.append(self._queue.popleft())
                    users += batch[-1].request.n_users
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            self._queued_users -= users
            self.metrics.queue_users.set(self._queued_users)
        return [q for q in batch if q.future.set_running_or_notify_cancel()]  # drop requests given up on

    def _run(self) -> None:
        own_streams(_devices(self.versions.active))  # a loading version's default-stream work is never ahead
        while True:
            batch = self._take()
            version = self.versions.switch()  # between batches: a loaded version takes over here
            if batch is None:
                return
            if batch:
                try:
                    self._score(batch, version)
                except Exception as exc:  # noqa: BLE001 (the worker outlives any batch: its requests get a 500)
                    log.exception("batch of %d requests failed", len(batch))
                    for q in batch:
                        if not q.future.done():
                            q.future.set_exception(exc)

    def _score(self, batch: list[_Queued], version: ServedVersion) -> None:
        now = time.perf_counter()
        ok: list[_Queued] = []
        for q in batch:
            self.metrics.queue_seconds.observe(now - q.enqueued)
            try:  # raw user / item ids through this version's key scheme and catalogue: the ones that score it
                q.request = key_users(q.request, version.user_key)
                _check_shard(version, q.request)
                q.request = to_dense_items(q.request, version.runtime.catalogue, version.n_items)
                ok.append(q)
            except Exception as exc:  # noqa: BLE001 (BadRequest: a 4xx; anything else: this request's 500)
                q.future.set_exception(exc)
        if not ok:
            return
        try:
            t0 = time.perf_counter()
            scores, cold, stats = score_together(version, [q.request for q in ok])
            self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        except Exception as exc:  # a runtime failure fails this batch's requests, not the server
            log.exception("batch of %d requests failed on store version %s", len(ok), version.store_version)
            for q in ok:
                q.future.set_exception(exc)
            return
        users = sum(q.request.n_users for q in ok)
        self.metrics.batch_users.observe(users)
        self.metrics.users.inc(users)
        self.metrics.cold_start.inc(stats.cold_start_users)
        self.metrics.tier(stats.tier_hits, stats.tier_misses, stats.tier_evictions)
        for q, s, c in zip(ok, scores, cold, strict=True):
            q.future.set_result(ScoreReply(s, c, version.model_version, version.store_version))


def _devices(version: ServedVersion | None) -> list:
    """The devices ``version`` scores on (one per shard runtime; none without a version)."""
    if version is None:
        return []
    runtime = version.runtime
    return [rt.device for rt in getattr(runtime, "runtimes", {0: runtime}).values()]


def _check_shard(version: ServedVersion, request: ScoreRequest) -> None:
    """BadRequest 421 (Misdirected Request) naming the owning shard, for a user this process does not serve."""
    try:
        version.check_owned(request.user_ids)
    except WrongShardError as exc:  # named by the id the client sent (a text id's key means nothing to it)
        message = str(exc)
        if request.raw_users is not None:
            message = message.replace(f"user {exc.user_id} ", f"user {request.raw_users[exc.position]!r} ", 1)
        raise BadRequest(f"{request.users_field}[{exc.position}]", message, 421) from None


def score_together(version: ServedVersion, requests: list[ScoreRequest]
                   ) -> tuple[list[np.ndarray], list[np.ndarray], RuntimeStats]:
    """Score several requests in one runtime call. Returns per request: probabilities (B_r, C_r)
    float32 (NaN in padding) and cold_start (B_r,) bool; and the call's runtime stats (tier counts)."""
    width = max(r.candidates.shape[1] for r in requests)
    ids = np.concatenate([r.user_ids for r in requests])
    n_cand = np.concatenate([r.n_candidates for r in requests])
    cand = np.zeros((len(ids), width), dtype=np.int64)
    lo = 0
    for r in requests:
        cand[lo : lo + r.n_users, : r.candidates.shape[1]] = r.candidates
        lo += r.n_users
    result = version.runtime.score(ids, cand, n_cand)
    probs = result.probabilities.astype(np.float32)
    scores, cold, lo = [], [], 0
    for r in requests:
        scores.append(probs[lo : lo + r.n_users, : r.candidates.shape[1]])
        cold.append(result.cold_start[lo : lo + r.n_users])
        lo += r.n_users
    return scores, cold, result.stats
