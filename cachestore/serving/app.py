"""The HTTP API: ``POST /score``, ``GET /healthz``, ``GET /metrics``.

``POST /score`` takes a JSON or Arrow IPC body (:mod:`cachestore.serving.payloads`), queues it in the
dynamic batcher and replies with the scores, the cold-start flags and the versions that scored them
(also in the ``X-Model-Version`` / ``X-Store-Version`` headers). Status codes: 200; 400 unreadable
body; 405 a method other than POST; 413 body, users or candidates over the limits; 415 other content
type; 422 a value out of range (the reply's ``field`` names it); 421 a user of a shard this server does
not serve (the message names the owning shard: route it there); 503 queue full, draining, or not scored
within request_timeout_s (``Retry-After: 1``); 500 a runtime failure (logged; the server keeps serving).

``POST /score`` is a plain ASGI handler (:func:`score_route`): the request path is one header scan,
one body read, the parse, the batcher and one reply, with nothing of a web framework in between — at
1 user × 64 candidates FastAPI's routing and middleware cost as much event-loop time as all the rest
(docs/serving.md, "One process"). Every other path goes to a FastAPI app (``/healthz``, ``/metrics``,
404s, and the lifespan hook that drains the queue on shutdown).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Response
from starlette.concurrency import run_in_threadpool

from collectivekv.cachestore.serving.batcher import DynamicBatcher, QueueFull, ShuttingDown
from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.metrics import CONTENT_TYPE, ServerMetrics
from collectivekv.cachestore.serving.payloads import (
    ARROW_MIME,
    JSON_MIME,
    BadRequest,
    Limits,
    ScoreReply,
    parse_arrow,
    parse_json,
    reply_arrow,
    reply_json,
)
from collectivekv.cachestore.serving.versions import VersionManager

log = logging.getLogger("ckv.serve")
_INLINE_BYTES = 1 << 16  # bodies up to this size are parsed on the event loop, larger ones in a thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ScoringService:
    """What the routes use: the version manager, the batcher and the metrics of one server."""

    def __init__(self, config: ServerConfig, versions: VersionManager, batcher: DynamicBatcher,
                 metrics: ServerMetrics) -> None:
        self.config = config
        self.versions = versions
        self.batcher = batcher
        self.metrics = metrics
        self.limits = Limits(config.max_request_users, config.max_candidates)
        self.closed = False

    def close(self, drain: bool = True) -> None:
        """Drain (or fail) the queue, stop the worker, release every version. Idempotent."""
        if not self.closed:
            self.closed = True
            self.batcher.close(drain=drain)
            self.versions.close()


class _ClientGone(Exception):
    """The client disconnected before its body arrived (nothing to reply to)."""


def _error_body(message: str, field: str) -> bytes:
    return json.dumps({"error": message, "field": field}).encode()


def _flag(value: str, name: str) -> bool:
    """A boolean query parameter: true/false, 1/0 (BadRequest naming it otherwise)."""
    text = value.strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise BadRequest(name, f"must be true or false, got {value[:40]!r}", 400)
    return text in ("true", "1")


def _headers(scope: Scope) -> tuple[str, int | None]:
    """(content type without parameters, lower case; declared content-length or None)."""
    ctype, length = JSON_MIME, None
    for name, value in scope["headers"]:
        if name == b"content-type":
            ctype = value.decode("latin-1").split(";")[0].strip().lower()
        elif name == b"content-length" and value.isdigit():
            length = int(value)
    return ctype, length


async def _read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    if declared is not None and declared > limit:
        raise BadRequest("body", f"{declared} bytes exceed the limit of {limit}: split the request", 413)
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest("body", f"more than {limit} bytes: split the request", 413)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _reply_of(future: Future, timeout_s: float) -> ScoreReply:
    """Await the batcher's future on this event loop: one ``call_soon_threadsafe`` from the worker thread
    when it resolves. A request given up on (timeout, client gone) is cancelled, so the worker drops it."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def settle(done: Future) -> None:
        if not waiter.done():
            exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
            if exc is None:
                waiter.set_result(done.result())
            else:
                waiter.set_exception(exc)

    future.add_done_callback(lambda done: loop.call_soon_threadsafe(settle, done))
    try:
        async with asyncio.timeout(timeout_s):
            return await waiter
    except BaseException:
        future.cancel()
        raise


async def _score(service: ScoringService, scope: Scope, receive: Receive, ctype: str, declared: int | None
                 ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
    """(status, body, media type, extra headers) of one POST /score; raises BadRequest and the batcher's errors."""
    arrow = ctype == ARROW_MIME
    if not arrow and ctype != JSON_MIME:
        raise BadRequest("content-type", f"{ctype!r} is not {JSON_MIME} or {ARROW_MIME}", 415)
    body = await _read_body(receive, service.config.max_body_bytes, declared)
    dense_ids = False
    if scope["query_string"]:
        query = parse_qs(scope["query_string"].decode("latin-1"))
        dense_ids = _flag(query.get("dense_ids", ["false"])[-1], "dense_ids")
    parse = parse_arrow if arrow else parse_json
    if len(body) <= _INLINE_BYTES:
        req = parse(body, service.limits, dense_ids)
    else:
        req = await run_in_threadpool(parse, body, service.limits, dense_ids)
    reply = await _reply_of(service.batcher.submit(req), service.config.request_timeout_s)
    content = reply_arrow(reply, req) if arrow else reply_json(reply, req.n_candidates)
    versions = [(b"x-model-version", reply.model_version.encode()), (b"x-store-version", reply.store_version.encode())]
    return 200, content, ARROW_MIME if arrow else JSON_MIME, versions


async def score_route(service: ScoringService, scope: Scope, receive: Receive, send: Send) -> None:
    """POST /score as a plain ASGI handler (module docstring): every outcome is one reply and one count."""
    t0 = time.perf_counter()
    ctype, declared = _headers(scope)
    headers: list[tuple[bytes, bytes]] = []
    try:
        status, content, media, headers = await _score(service, scope, receive, ctype, declared)
    except BadRequest as exc:
        status, content, media = exc.status, _error_body(exc.message, exc.field), JSON_MIME
    except (QueueFull, ShuttingDown) as exc:
        status, content, media = 503, _error_body(f"{exc}: retry later", "queue"), JSON_MIME
    except TimeoutError:
        status, media = 503, JSON_MIME
        content = _error_body(f"not scored within {service.config.request_timeout_s} s: retry later", "queue")
    except _ClientGone:
        return
    except Exception as exc:  # a runtime failure: logged by the batcher, reported, server keeps serving
        log.error("POST /score failed: %s: %s", type(exc).__name__, exc)
        status, media = 500, JSON_MIME
        content = _error_body(f"scoring failed ({type(exc).__name__}); the server keeps serving", "server")
    if status == 503:
        headers = [(b"retry-after", b"1")]
    headers += [(b"content-type", media.encode()), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
    service.metrics.reply(status, ctype == ARROW_MIME, time.perf_counter() - t0)


async def _method_not_allowed(send: Send) -> None:
    content = _error_body("use POST", "method")
    await send({"type": "http.response.start", "status": 405,
                "headers": [(b"allow", b"POST"), (b"content-type", JSON_MIME.encode()),
                            (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


def _fastapi(service: ScoringService) -> FastAPI:
    """Everything but POST /score: /healthz, /metrics, 404s, and the shutdown that drains the queue."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(title="ckv serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        versions = service.versions
        active = versions.active
        doc = {"status": "draining" if service.closed or active is None else "ok",
               "store_version": active.store_version if active else None,
               "model_version": active.model_version if active else None,
               "queue_users": service.batcher.queued_users, "swaps": versions.swaps,
               "failed_swaps": versions.failed_swaps, "last_error": versions.last_error,
               "shards": active.shards if active else None}
        return Response(json.dumps(doc), 200 if doc["status"] == "ok" else 503, media_type=JSON_MIME)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(service.metrics.render(), 200, media_type=CONTENT_TYPE)

    return app


def create_app(service: ScoringService) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI application of one server: ``/score`` to :func:`score_route`, the rest to FastAPI."""
    rest = _fastapi(service)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/score":
            if scope["method"] == "POST":
                await score_route(service, scope, receive, send)
            else:
                await _method_not_allowed(send)
            return
        await rest(scope, receive, send)

    return app
