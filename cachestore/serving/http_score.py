"""``POST /score`` on an HTTP connection (:class:`ScorePath`, a mixin of :class:`cachestore.serving.http._Connection`):
the body parsed on the event loop (over :data:`~cachestore.serving.app.INLINE_BYTES`, or Arrow: in a thread),
``batcher.submit`` without a coroutine, the worker thread's result brought back with one ``call_soon_threadsafe``,
and a timer answering 503 after ``request_timeout_s``. It uses the connection's request state (``body``,
``content_type``), its ``service``, ``loop`` and ``pending`` futures, and answers through its ``_answer``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from collectivekv.cachestore.serving.app import INLINE_BYTES, Reply
from collectivekv.cachestore.serving.payloads import ARROW_MIME, ScoreRequest


class ScorePath:
    """The ``POST /score`` handling of a connection (module docstring)."""

    service: Any
    loop: Any
    body: list[bytes]
    content_type: str
    pending: set[Future]
    _answer: Callable[[Any, Reply], None]  # the connection's: fill the slot, write the replies now due

    def _score(self, slot: Any, query: bytes | None) -> None:
        t0 = time.perf_counter()
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        arrow = self.content_type == ARROW_MIME
        try:
            arrow, dense = self.service.check_score(self.content_type, query)
            if len(body) <= INLINE_BYTES and not arrow:  # Arrow may decode to far more than it sends
                self._submit(slot, self.service.parse(body, arrow, dense), arrow, t0)
            else:
                self.loop.create_task(self._parse_large(slot, body, arrow, dense, t0))  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 (BadRequest and the batcher's refusals: each is a reply)
            self._scored_reply(slot, self.service.failed(exc), arrow, t0)

    async def _parse_large(self, slot: Any, body: bytes, arrow: bool, dense: bool, t0: float) -> None:
        try:
            request = await self.loop.run_in_executor(None, self.service.parse, body, arrow, dense)  # type: ignore
            self._submit(slot, request, arrow, t0)
        except Exception as exc:  # noqa: BLE001
            self._scored_reply(slot, self.service.failed(exc), arrow, t0)

    def _submit(self, slot: Any, request: ScoreRequest, arrow: bool, t0: float) -> None:
        future = self.service.batcher.submit(request)  # QueueFull / ShuttingDown: the caller's reply
        self.pending.add(future)
        loop = self.loop
        timer = loop.call_later(self.service.config.request_timeout_s, self._expire, slot, future, arrow, t0)  # type: ignore

        def done(f: Future) -> None:  # in the worker thread
            loop.call_soon_threadsafe(self._result, slot, f, request, arrow, t0, timer)  # type: ignore[union-attr]

        future.add_done_callback(done)

    def _result(self, slot: Any, future: Future, request: ScoreRequest, arrow: bool, t0: float,
                timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        self.pending.discard(future)
        if slot.data is not None or future.cancelled():
            return  # timed out, or the client left
        exc = future.exception()
        reply = self.service.failed(exc) if exc is not None else self.service.scored(future.result(), request, arrow)
        self._scored_reply(slot, reply, arrow, t0)

    def _expire(self, slot: Any, future: Future, arrow: bool, t0: float) -> None:
        if slot.data is None:
            future.cancel()
            self._scored_reply(slot, self.service.failed(TimeoutError()), arrow, t0)

    def _scored_reply(self, slot: Any, reply: Reply, arrow: bool, t0: float) -> None:
        self._answer(slot, reply)
        self.service.metrics.reply(reply.status, arrow, time.perf_counter() - t0)
