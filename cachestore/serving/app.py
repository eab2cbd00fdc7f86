"""The HTTP API of ``ckv serve``, independent of the transport: what each route answers.

``POST /score`` takes a JSON or Arrow IPC body (:mod:`cachestore.serving.payloads`), queues it in the
dynamic batcher and replies with the scores, the cold-start flags and the versions that scored them
(also in the ``X-Model-Version`` / ``X-Store-Version`` headers). Status codes: 200; 400 unreadable
body or malformed HTTP; 404 another path; 405 another method; 413 body, users or candidates over the
limits; 415 other content type; 422 a value out of range (the reply's ``field`` names it); 421 a user of
a shard this server does not serve (the message names the owning shard: route it there); 503 queue full,
draining, or not scored within request_timeout_s (``Retry-After: 1``); 500 a runtime failure (logged; the
server keeps serving). Every error body is ``{"error": message, "field": name}``.
``GET /healthz``: the version served, queue and swap counts (503 while draining); ``GET /metrics``:
Prometheus text. :mod:`cachestore.serving.http` carries these replies over HTTP/1.1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from urllib.parse import parse_qs

from collectivekv.cachestore.serving.batcher import DynamicBatcher, QueueFull, ShuttingDown
from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.metrics import CONTENT_TYPE, ServerMetrics
from collectivekv.cachestore.serving.payloads import (
    ARROW_MIME,
    JSON_MIME,
    BadRequest,
    Limits,
    ScoreReply,
    ScoreRequest,
    parse_arrow,
    parse_json,
    reply_arrow,
    reply_json,
)
from collectivekv.cachestore.serving.versions import VersionManager

log = logging.getLogger("ckv.serve")
INLINE_BYTES = 1 << 16  # bodies up to this size are parsed on the event loop, larger ones in a thread


@dataclass(frozen=True)
class Reply:
    """One HTTP reply: status, body, media type and extra headers (lower-case names)."""

    status: int
    body: bytes
    media: str = JSON_MIME
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(status: int, message: str, field: str) -> Reply:
    """``{"error", "field"}`` with ``status`` (503 adds ``Retry-After: 1``)."""
    headers = (("retry-after", "1"),) if status == 503 else ()
    return Reply(status, json.dumps({"error": message, "field": field}).encode(), JSON_MIME, headers)


class ScoringService:
    """What the routes use: the version manager, the batcher and the metrics of one server."""

    def __init__(self, config: ServerConfig, versions: VersionManager, batcher: DynamicBatcher,
                 metrics: ServerMetrics) -> None:
        self.config = config
        self.versions = versions
        self.batcher = batcher
        self.metrics = metrics
        # a request larger than the queue could never be queued: 413 at parsing, like any oversized request
        self.limits = Limits(min(config.max_request_users, config.max_queue_users), config.max_candidates)
        self.closed = False
        self.draining = False  # set when shutdown begins: /healthz turns 503 while the queue drains

    def close(self, drain: bool = True) -> None:
        """Drain (or fail) the queue, stop the worker, release every version. Idempotent."""
        if not self.closed:
            self.closed = self.draining = True
            self.batcher.close(drain=drain)
            self.versions.close()

    def refused_unread(self, path: bytes | None, method: bytes, content_type: str, query: bytes | None
                       ) -> Reply | None:
        """What a request gets from its head alone when no body could change it (the reply to an ``Expect:
        100-continue`` that comes instead of 100): 404 an unknown path, 405 ``/score`` not POSTed, 415 / 400 its
        content type or query; None when the body decides (also a URL without a path: 400 after it)."""
        if path is None or path in (b"/healthz", b"/metrics"):
            return None
        if path != b"/score":
            return error_reply(404, f"no route {path.decode('latin-1')[:80]!r}", "path")
        if method != b"POST":
            return not_allowed("POST")
        try:
            self.check_score(content_type, query)
        except BadRequest as exc:
            return error_reply(exc.status, exc.message, exc.field)
        return None

    # ------------------------------------------------------------------------------------------ POST /score

    def check_score(self, content_type: str, query: bytes | None) -> tuple[bool, bool]:
        """(arrow, dense_ids) of a POST /score from its content type (parameters stripped, lower case) and
        URL query; BadRequest 415 / 400 naming the header or parameter."""
        params = parse_qs(query.decode("latin-1"), True) if query else {}
        arrow = content_type == ARROW_MIME
        if not arrow and content_type != JSON_MIME:
            raise BadRequest("content-type", f"{content_type!r} is not {JSON_MIME} or {ARROW_MIME}", 415)
        dense_ids = _flag(params["dense_ids"][-1], "dense_ids") if "dense_ids" in params else False
        return arrow, dense_ids

    def parse(self, body: bytes, arrow: bool, dense_ids: bool) -> ScoreRequest:
        """The validated request (BadRequest naming the field otherwise)."""
        return (parse_arrow if arrow else parse_json)(body, self.limits, dense_ids)

    @staticmethod
    def scored(reply: ScoreReply, request: ScoreRequest, arrow: bool) -> Reply:
        """The 200 reply of a scored request."""
        headers = (("x-model-version", reply.model_version), ("x-store-version", reply.store_version))
        if arrow:
            return Reply(200, reply_arrow(reply, request), ARROW_MIME, headers)
        return Reply(200, reply_json(reply, request.n_candidates), JSON_MIME, headers)

    def failed(self, exc: BaseException) -> Reply:
        """The reply for what stopped a POST /score (the runtime's failures are logged; the server keeps on)."""
        if isinstance(exc, BadRequest):
            return error_reply(exc.status, exc.message, exc.field)
        if isinstance(exc, (QueueFull, ShuttingDown)):
            return error_reply(503, f"{exc}: retry later", "queue")
        if isinstance(exc, TimeoutError):
            return error_reply(503, f"not scored within {self.config.request_timeout_s} s: retry later", "queue")
        log.error("POST /score failed: %s: %s", type(exc).__name__, exc)
        return error_reply(500, f"scoring failed ({type(exc).__name__}); the server keeps serving", "server")

    # ------------------------------------------------------------------------------------------ GET routes

    def healthz(self) -> Reply:
        versions = self.versions
        active = versions.active
        doc = {"status": "draining" if self.draining or active is None else "ok",
               "store_version": active.store_version if active else None,
               "model_version": active.model_version if active else None,
               "queue_users": self.batcher.queued_users, "swaps": versions.swaps,
               "failed_swaps": versions.failed_swaps, "last_error": versions.last_error,
               "shards": active.shards if active else None, "user_key": active.user_key if active else None}
        return Reply(200 if doc["status"] == "ok" else 503, json.dumps(doc).encode())

    def metrics_text(self) -> Reply:
        return Reply(200, self.metrics.render(), CONTENT_TYPE)


def not_allowed(allow: str) -> Reply:
    """405 naming the method to use, with the Allow header."""
    reply = error_reply(405, f"use {allow}", "method")
    return Reply(reply.status, reply.body, reply.media, (("allow", allow),))


def _flag(value: str, name: str) -> bool:
    """A boolean query parameter: true/false, 1/0 (BadRequest naming it otherwise)."""
    text = value.strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise BadRequest(name, f"must be true or false, got {value[:40]!r}", 400)
    return text in ("true", "1")
