"""Prometheus metrics of one serving process (``GET /metrics``).

Each :class:`ServerMetrics` owns its own ``CollectorRegistry`` (several servers in one process — tests,
benchmarks — do not share counters). With several worker processes on one port (``ckv serve --workers N``,
:mod:`cachestore.serving.workers`) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts them:
every worker then writes its values to files there and ``render()`` — whichever worker answers the
scrape — reports the sums over all workers (counters and histograms summed; ``queue_users`` summed over
live workers; ``store_version_info`` 1 for every version some live worker serves). Names (all prefixed
``ckv_``):

    request_seconds{format}        histogram  request latency, body received → reply encoded
    queue_seconds                  histogram  time a request waited in the batcher's queue
    batch_users                    histogram  users per device batch
    batch_seconds                  histogram  time the worker spent scoring a device batch (runtime.score)
    requests_total{status}         counter    replies by HTTP status code
    users_scored_total             counter    users scored (one per user id in a request)
    cold_start_users_total         counter    users absent from the store (scored with an empty history)
    tier_hits_total / tier_misses_total / tier_evictions_total
                                   counter    GPU-resident tier lookups (0 while no tier is configured)
    queue_users                    gauge      users waiting in the queue now
    store_version_info{store_version,model_version}
                                   gauge      1 for the version being served
    swaps_total / failed_swaps_total
                                   counter    versions switched to / versions that failed to load
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported for app.py)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it is first imported

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    """The metrics above, registered in a private registry; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_seconds = Histogram("ckv_request_seconds", "POST /score latency", ["format"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("ckv_queue_seconds", "time in the batcher queue", buckets=_LATENCY_BUCKETS,
                                       registry=r)
        self.batch_users = Histogram("ckv_batch_users", "users per device batch", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ckv_batch_seconds", "runtime.score time per device batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("ckv_requests_total", "POST /score replies, and refusals of requests read in part, "
                                "by status", ["status"], registry=r)
        self.users = Counter("ckv_users_scored_total", "users scored", registry=r)
        self.cold_start = Counter("ckv_cold_start_users_total", "users absent from the store", registry=r)
        self.tier_hits = Counter("ckv_tier_hits_total", "resident tier hits", registry=r)
        self.tier_misses = Counter("ckv_tier_misses_total", "resident tier misses", registry=r)
        self.tier_evictions = Counter("ckv_tier_evictions_total", "resident tier evictions", registry=r)
        self.queue_users = Gauge("ckv_queue_users", "users waiting in the queue", registry=r,
                                 multiprocess_mode="livesum")
        self.version = Gauge("ckv_store_version_info", "the version being served (value 1)",
                             ["store_version", "model_version"], registry=r, multiprocess_mode="livemax")
        self._served: tuple[str, str] | None = None
        self._multiproc_dir = os.environ.get(MULTIPROC_ENV) or None
        self.swaps = Counter("ckv_swaps_total", "versions switched to after the first", registry=r)
        self.failed_swaps = Counter("ckv_failed_swaps_total", "versions that failed to load", registry=r)
        self._by_status: dict[int, Counter] = {}
        self._json_seconds = self.request_seconds.labels("json")
        self._arrow_seconds = self.request_seconds.labels("arrow")

    def serving(self, store_version: str, model_version: str) -> None:
        """Mark this version as the one served (and no other)."""
        if self._served is not None:  # 0 first: in multiprocess mode clear() leaves the value in the file
            self.version.labels(*self._served).set(0)
        if self._multiproc_dir is None:  # (multiprocess mode cannot clear; the old labels read 0 there)
            self.version.clear()
        self.version.labels(store_version, model_version).set(1)
        self._served = (store_version, model_version)

    def reply(self, status: int, arrow: bool, seconds: float) -> None:
        """Count one POST /score reply and its latency (label children cached: this runs per request)."""
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self.requests.labels(str(status))
        counter.inc()
        (self._arrow_seconds if arrow else self._json_seconds).observe(seconds)

    def refused(self, status: int) -> None:
        """Count a request refused before it was read whole (malformed HTTP, 413 body, 431 headers, ...)."""
        self.requests.labels(str(status)).inc()

    def tier(self, hits: int, misses: int, evictions: int) -> None:
        """Add one batch's tier counts."""
        self.tier_hits.inc(hits)
        self.tier_misses.inc(misses)
        self.tier_evictions.inc(evictions)

    def render(self) -> bytes:
        """The /metrics body: this registry, or in multiprocess mode the sums over every worker's files."""
        if self._multiproc_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._multiproc_dir)
        return generate_latest(registry)
