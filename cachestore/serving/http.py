"""HTTP/1.1 for ``ckv serve``: an asyncio protocol over httptools, one connection object per client.

Why not an ASGI framework: a request of one user × 64 candidates costs the scoring thread a few µs, and
everything else is the event loop's, under the one GIL it shares with the scoring thread. An ASGI server
runs each request as a task with message dicts and coroutine hops between the body, the queue and the
reply; this protocol handles a request in plain callbacks (docs/serving.md, "One process", has the load
figures). For the cheapest reply alone (`benchmarks/http_overhead.py`, one core) it costs 51–54 µs of CPU
against 66–77 µs for a bare ASGI app on uvicorn, before any framework. It uses the same parser as uvicorn
(httptools, llhttp) and uvloop's event loop when installed.

Per connection (:class:`_Connection`): requests are parsed as bytes arrive; each gets a *slot* in arrival
order and replies are written in that order (pipelining), as soon as the slot at the head is done.
``POST /score`` is handled without a coroutine (:mod:`cachestore.serving.http_score`).

Limits: the URL (8 KiB, else 414), the header block (32 KiB, else 431; a head or chunked trailer still unfinished
after :data:`HEAD_SLACK` more bytes of reads is a 431 too, since httptools hands a header over only once it ends),
the body (``max_body_bytes``, else 413 — at once from Content-Length, or as the chunks arrive), at most
:data:`MAX_PIPELINED` unanswered requests per connection (reading pauses beyond it, and while the client does not
read its replies: it resumes only when both allow; a read is parsed :data:`FEED_PIECE` bytes at a time outside
a body, so parsing stops there too and keeps the rest for later). Malformed HTTP, and a URL httptools cannot
parse, get 400 and the connection closes; so do the three limits above (each counted in ``ckv_requests_total``).
A sweep once a second closes connections idle for ``keepalive_s`` since their last byte in or reply out, a head
(or trailer) not complete ``header_timeout_s`` after it began however its bytes trickle, and a body with no byte for
``header_timeout_s`` (both in :class:`~cachestore.serving.config.ServerConfig`). ``Expect: 100-continue`` is
answered in reply order. Shutdown (:meth:`HttpServer.run`'s stop event): ``/healthz`` turns 503, stop
accepting, close idle connections, answer every request already read, then close the rest.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Future
from typing import Any

import httptools

from collectivekv.cachestore.serving.app import Reply, ScoringService, error_reply, not_allowed
from collectivekv.cachestore.serving.http_score import ScorePath
from collectivekv.cachestore.serving.payloads import JSON_MIME
from collectivekv.cachestore.serving.wire import encode

MAX_URL = 8 << 10
MAX_HEADER_BYTES = 32 << 10
MAX_PIPELINED = 64  # unanswered requests per connection before reading pauses (resumes at a quarter)
HEAD_SLACK = 256 << 10  # counted in parsed pieces, which may hold earlier requests too
FEED_PIECE = 4 << 10  # bytes parsed at a time outside a body: reading pauses within one piece's requests


class _Slot:
    """One request's place in its connection's reply order: its bytes once answered; close after it?"""

    __slots__ = ("data", "close", "head")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.head = False  # a HEAD request: the reply's head only
        self.close = False


class HttpServer:
    """The listening side: one :class:`ScoringService` behind a listening socket."""

    def __init__(self, service: ScoringService, sock: Any) -> None:
        self.service = service
        self.sock = sock
        self.keepalive_s = service.config.keepalive_s
        self.header_timeout_s = service.config.header_timeout_s
        self.connections: set[_Connection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down gracefully (module docstring) and drain the queue."""
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(lambda: _Connection(self), sock=self.sock, backlog=2048)
        sweeper = self.loop.create_task(self._sweep())
        try:
            await stop.wait()
        finally:
            self.service.draining = True
            server.close()
            sweeper.cancel()
            for conn in list(self.connections):
                conn.shut()
            deadline = self.loop.time() + self.service.config.request_timeout_s + 1.0
            while self.connections and self.loop.time() < deadline:
                await asyncio.sleep(0.01)
            for conn in list(self.connections):
                conn.abort()
            await self.loop.run_in_executor(None, self.service.close)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()  # type: ignore[union-attr]
            for conn in list(self.connections):
                conn.expire(now)


class _Connection(ScorePath, asyncio.Protocol):
    """One client connection (module docstring). Parser callbacks are the ``on_*`` methods."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.service = server.service
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.slots: deque[_Slot] = deque()
        self.pending: set[Future] = set()
        self.dead = self.closing = self.paused = self.in_message = self.write_paused = False
        self.head_bytes = 0  # bytes received inside one head or trailer section (httptools buffers it whole)
        self.in_head = False
        self.active = 0.0  # when the last byte arrived or the last reply left (the keep-alive clock)
        self.section_start = 0.0  # when the head (or trailer) being read began: header_timeout_s to complete it
        self.unsent = 1 << 62  # reply bytes buffered at the sweep's last close attempt
        self.held = b""  # bytes read but not parsed: reading paused within them
        self.feeding = False  # inside _feed
        self.body_left = 0  # bytes of the current body still to come, by its Content-Length
        self._reset()

    def _reset(self) -> None:
        self.trailing = False
        self.url = b""
        self.expect_continue = False
        self.content_type = JSON_MIME
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0

    # -------------------------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.active = self.loop.time()  # type: ignore[union-attr]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.dead = True
        for future in self.pending:
            future.cancel()  # still queued: the batcher drops it
        self.pending.clear()

    def pause_writing(self) -> None:  # the client is not reading its replies: read no more of its requests
        self.write_paused = True
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume()

    def _may_read(self) -> bool:
        """Neither too many replies due, nor the client not reading them, nor the connection refused."""
        return not (self.dead or self.paused or self.write_paused)

    def _resume(self) -> None:  # from _flush too, maybe inside a parser callback: parse the held bytes after it
        if self._may_read():
            self.loop.call_soon(self._go_on)  # type: ignore[union-attr]

    def _go_on(self) -> None:
        if not self._may_read():
            return
        held, self.held = self.held, b""
        self.active = self.loop.time()  # type: ignore[union-attr]  # the held bytes count as read now
        self._feed(held)
        if self._may_read() and not self.transport.is_closing():  # type: ignore[union-attr]
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _close_if_done(self) -> None:
        """Shutting down: close once no reply is due, no request partly read and no byte held or being parsed."""
        if self.closing and not (self.slots or self.in_message or self.held or self.feeding):
            self.transport.close()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        self.active = self.loop.time()  # type: ignore[union-attr]
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` a piece at a time — a body whole (by its Content-Length), else :data:`FEED_PIECE` bytes
        — and once reading pauses (too many replies due, or the client not reading them) keep the rest in
        ``held``: one read of many small pipelined requests queues at most a piece's worth past the limit."""
        view, at = memoryview(data), 0
        self.feeding = True  # a reply written meanwhile must not close a shutting connection: more may follow
        while at < len(view) and not self.dead:
            if not self._may_read():
                self.held = bytes(view[at:])
                break
            piece = view[at : at + max(self.body_left, FEED_PIECE)]
            at += len(piece)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._fatal(400, "protocol upgrades are not supported", "upgrade")
            except httptools.HttpParserError as exc:
                self._fatal(400, f"malformed HTTP request ({str(exc)[:80]})", "http")
            if self.in_head and not self.dead:  # httptools hands a header over only once complete: bound the
                self.head_bytes += len(piece)  # pieces that end inside one request's head
                if self.head_bytes > MAX_URL + MAX_HEADER_BYTES + HEAD_SLACK:
                    limit = MAX_URL + MAX_HEADER_BYTES
                    self._fatal(431, f"the request line and headers (or trailers) exceed {limit} bytes", "headers")
        self.feeding = False
        self._close_if_done()

    # -------------------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self.in_message = True
        self._begin_section()
        self._reset()

    def _begin_section(self) -> None:  # a head or trailer: bytes bounded, clock started (this read came at active)
        self.in_head = True
        self.head_bytes = 0
        self.section_start = self.active

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.trailing = True  # header fields from here on are trailers: bounded, never read as headers
        self.head_bytes = 0
        if self.expect_continue and not self.dead:  # after the earlier pipelined replies, like any reply
            try:
                url = httptools.parse_url(self.url)
                refused = self.service.refused_unread(url.path, self.parser.get_method(), self.content_type, url.query)
            except httptools.HttpParserInvalidURLError:
                refused = None  # answered after the body, as without Expect
            if refused is not None:  # the final status instead of 100: the client sends no body (RFC 9110 10.1.1)
                self._close_with(refused, count=False)
                if refused.status in (400, 415):  # counted as POST /score replies, as without Expect
                    self.service.metrics.reply(refused.status, False, 0.0)
                return
            slot = _Slot()
            slot.data = b"HTTP/1.1 100 Continue\r\n\r\n"
            self.slots.append(slot)
            self._flush()

    def on_chunk_header(self) -> None:  # a trailer section may follow (the last chunk): bound it like a head
        self._begin_section()

    def on_chunk_complete(self) -> None:
        self.in_head = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            self._fatal(414, f"the URL is longer than {MAX_URL} bytes", "url")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._fatal(431, f"the headers exceed {MAX_HEADER_BYTES} bytes", "headers")
            return
        if self.trailing:
            return
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1").split(";")[0].strip().lower()
        elif name == b"content-length" and value.isdigit():
            limit = self.service.config.max_body_bytes
            digits = value.lstrip(b"0") or b"0"
            if len(digits) > 18 or int(digits) > limit:
                self._fatal(413, f"{digits[:40].decode()} bytes exceed the limit of {limit}: split the request", "body")
            else:
                self.body_left = int(digits)
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True

    def on_body(self, chunk: bytes) -> None:
        self.in_head = False
        self.body_left -= len(chunk)
        self.body_size += len(chunk)
        limit = self.service.config.max_body_bytes
        if self.body_size > limit:
            self._fatal(413, f"more than {limit} bytes: split the request", "body")
        elif not self.dead:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.in_message = self.in_head = False
        self.body_left = 0
        if self.parser.should_upgrade():
            self._fatal(400, "protocol upgrades are not supported", "upgrade")
        if self.dead:
            return
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._fatal(400, f"malformed URL {self.url[:80].decode('latin-1')!r}", "url")
            return
        if url.path is None:  # an absolute URL without a path ("http://host"): before a slot is queued for it
            self._fatal(400, f"URL without a path {self.url[:80].decode('latin-1')!r}", "url")
            return
        slot = _Slot()
        slot.close = not self.parser.should_keep_alive()
        method = self.parser.get_method()
        slot.head = method == b"HEAD"
        self.slots.append(slot)
        if len(self.slots) > MAX_PIPELINED and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        if url.path == b"/score":
            if method == b"POST":
                self._score(slot, url.query)
            else:
                self._answer(slot, not_allowed("POST"))
        elif url.path in (b"/healthz", b"/metrics"):
            if method == b"GET":
                reply = self.service.healthz() if url.path == b"/healthz" else self.service.metrics_text()
                self._answer(slot, reply)
            else:
                self._answer(slot, not_allowed("GET"))
        else:
            self._answer(slot, error_reply(404, f"no route {url.path.decode('latin-1')[:80]!r}", "path"))

    # -------------------------------------------------------------------------------- replies, lifetime

    def _answer(self, slot: _Slot, reply: Reply) -> None:
        """Fill ``slot`` and write every reply that is now first in line."""
        slot.data = encode(reply, slot.close or self.closing)
        if slot.head:
            slot.data = slot.data[: len(slot.data) - len(reply.body)]
        self._flush()

    def _flush(self) -> None:
        """Write the replies at the head of the line that are ready; the keep-alive clock restarts."""
        slots = self.slots
        if self.transport.is_closing():  # type: ignore[union-attr]
            slots.clear()  # the client left: nothing more to write
            return
        if slots and slots[0].data is not None:
            self.active = self.loop.time()  # type: ignore[union-attr]
        while slots and slots[0].data is not None:
            head = slots.popleft()
            self.transport.write(head.data)  # type: ignore[union-attr]
            if head.close:
                self.dead = True
                self.transport.close()  # type: ignore[union-attr]
                return
        if self.paused and len(slots) <= MAX_PIPELINED // 4:
            self.paused = False
            self._resume()  # once the client reads its replies again too
        self._close_if_done()

    def _fatal(self, status: int, message: str, field: str) -> None:  # a refusal counted in ckv_requests_total
        self._close_with(error_reply(status, message, field), count=True)

    def _close_with(self, reply: Reply, count: bool) -> None:
        """Answer ``reply`` after the replies already due, then close; read nothing more."""
        if self.dead:
            return
        self.dead = True
        self.in_head = False  # nothing more is read: no head deadline runs
        slot = _Slot()
        slot.close = True
        self.slots.append(slot)
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._answer(slot, reply)
        if count:
            self.service.metrics.refused(reply.status)

    def shut(self) -> None:
        """Shutdown: close now if idle, else after the replies to the requests already read."""
        self.closing = True
        self._close_if_done()

    def expire(self, now: float) -> None:
        """The sweep: close a connection idle past keep-alive (since its last byte in or reply out), one whose
        request head (or trailer) is not complete ``header_timeout_s`` after it began, however its bytes trickle,
        and one whose body stalls (no byte) for ``header_timeout_s``. One waiting for its replies stays; one whose
        client reads no reply for a sweep is aborted (a close would wait for it to read). The head clock stops
        while the server does not read (too many replies due, or the client not reading them)."""
        reading = self._may_read()
        if self.in_head and not reading:  # the head clock runs only while the server reads the connection
            self.section_start = now
        if self.in_head and reading:
            late = now - self.section_start > self.server.header_timeout_s
        elif self.slots or (self.held and not self.write_paused):  # held bytes are parsed once reading may go on
            return
        else:
            late = now - self.active > (self.server.header_timeout_s if self.in_message else self.server.keepalive_s)
        if late:  # close; abort when replies wait unread and none was read since the last sweep (close would wait)
            pending = self.transport.get_write_buffer_size()  # type: ignore[union-attr]
            if not pending:
                self.transport.close()  # type: ignore[union-attr]
            elif pending >= self.unsent:
                self.transport.abort()  # type: ignore[union-attr]
            self.unsent = pending

    def abort(self) -> None:
        self.transport.abort()  # type: ignore[union-attr]

