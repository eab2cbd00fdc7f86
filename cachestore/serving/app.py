"""The HTTP API (FastAPI): ``POST /score``, ``GET /healthz``, ``GET /metrics``.

``POST /score`` takes a JSON or Arrow IPC body (:mod:`cachestore.serving.payloads`), queues it in the
dynamic batcher and replies with the scores, the cold-start flags and the versions that scored them
(also in the ``X-Model-Version`` / ``X-Store-Version`` headers). Status codes: 200; 400 unreadable
body; 413 body, users or candidates over the limits; 415 other content type; 422 a value out of range
(the reply's ``field`` names it); 421 a user of a shard this server does not serve (the message names the owning
shard: route it there); 503 queue full, draining, or not scored within request_timeout_s
(``Retry-After: 1``); 500 a runtime failure (logged; the server keeps serving). Routes return
``Response`` objects built here, so no request body passes through pydantic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from collectivekv.cachestore.serving.batcher import DynamicBatcher, QueueFull, ShuttingDown
from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.metrics import CONTENT_TYPE, ServerMetrics
from collectivekv.cachestore.serving.payloads import (
    ARROW_MIME,
    JSON_MIME,
    BadRequest,
    Limits,
    parse_arrow,
    parse_json,
    reply_arrow,
    reply_json,
)
from collectivekv.cachestore.serving.versions import VersionManager

log = logging.getLogger("ckv.serve")
_INLINE_BYTES = 1 << 16  # bodies up to this size are parsed on the event loop, larger ones in a thread


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


def _error(status: int, message: str, field: str) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return Response(json.dumps({"error": message, "field": field}), status, headers, media_type=JSON_MIME)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest("body", f"{declared} bytes exceed the limit of {limit}: split the request", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest("body", f"more than {limit} bytes: split the request", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _flag(value: str, name: str) -> bool:
    """A boolean query parameter: true/false, 1/0 (BadRequest naming it otherwise)."""
    text = value.strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise BadRequest(name, f"must be true or false, got {value[:40]!r}", 400)
    return text in ("true", "1")


async def _score(service: ScoringService, request: Request, arrow: bool) -> Response:
    body = await _read_body(request, service.config.max_body_bytes)
    parse = parse_arrow if arrow else parse_json
    dense_ids = _flag(request.query_params.get("dense_ids", "false"), "dense_ids")
    if len(body) <= _INLINE_BYTES:
        req = parse(body, service.limits, dense_ids)
    else:
        req = await run_in_threadpool(parse, body, service.limits, dense_ids)
    future = service.batcher.submit(req)
    reply = await asyncio.wait_for(asyncio.wrap_future(future), service.config.request_timeout_s)
    if arrow:
        content, media = reply_arrow(reply, req), ARROW_MIME
    else:
        content, media = reply_json(reply, req.n_candidates), JSON_MIME
    headers = {"X-Model-Version": reply.model_version, "X-Store-Version": reply.store_version}
    return Response(content, 200, headers, media_type=media)




def create_app(service: ScoringService) -> FastAPI:
    """The FastAPI application of one server; its shutdown drains the queue (``service.close``)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(title="ckv serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = service.metrics

    @app.post("/score")
    async def score(request: Request) -> Response:
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", JSON_MIME).split(";")[0].strip().lower()
        arrow = ctype == ARROW_MIME
        try:
            if ctype not in (JSON_MIME, ARROW_MIME):
                raise BadRequest("content-type", f"{ctype!r} is not {JSON_MIME} or {ARROW_MIME}", 415)
            response = await _score(service, request, arrow)
        except BadRequest as exc:
            response = _error(exc.status, exc.message, exc.field)
        except (QueueFull, ShuttingDown) as exc:
            response = _error(503, f"{exc}: retry later", "queue")
        except TimeoutError:
            response = _error(503, f"not scored within {service.config.request_timeout_s} s: retry later", "queue")
        except Exception as exc:  # a runtime failure: logged by the batcher, reported, server keeps serving
            log.error("POST /score failed: %s: %s", type(exc).__name__, exc)
            response = _error(500, f"scoring failed ({type(exc).__name__}); the server keeps serving", "server")
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.request_seconds.labels("arrow" if arrow else "json").observe(time.perf_counter() - t0)
        return response

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
        return Response(metrics.render(), 200, media_type=CONTENT_TYPE)

    return app
