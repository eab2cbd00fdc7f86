"""HTTP/1.1 of `ckv serve` (cachestore/serving/http.py) from raw sockets on 127.0.0.1: keep-alive, pipelined
replies in request order, chunked bodies, Expect: 100-continue, the URL / header / body limits, malformed
requests, unknown routes and methods, and connections left open at shutdown."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from collectivekv.cachestore.serving import http
from collectivekv.cachestore.serving.app import Reply
from collectivekv.cachestore.serving.http import MAX_HEADER_BYTES, MAX_PIPELINED, MAX_URL
from collectivekv.cachestore.serving.server import RunningServer
from collectivekv.cachestore.serving.wire import encode
from tests.server_fixtures import ModelStore, start_server


class _Client:
    """A raw HTTP/1.1 client: send bytes, read replies framed by Content-Length."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        """The next reply: status, headers (lower-case names), body; (0, {}, b"") when the server closed."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return 0, {}, b""
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
        while len(self.buf) < int(headers["content-length"]):
            assert self._fill(), "connection closed inside a body"
        n = int(headers["content-length"])
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        return not self.buf and not self._fill()

    def close(self) -> None:
        self.sock.close()


def _post(body: bytes, path: str = "/score", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


def _flood(client: _Client, start: bytes) -> int:
    """Send ``start`` then up to 16 MiB of one header (or trailer) value that never ends; the bytes sent before the
    server answered and closed (the rest of the flood is refused by the socket)."""
    client.sock.settimeout(5)
    sent = 0
    try:
        client.send(start)
        while sent < (16 << 20):
            client.send(b"a" * (64 << 10))
            sent += 64 << 10
    except OSError:
        pass
    return sent


def _score_body(user: int, items: list[int]) -> bytes:
    return json.dumps({"user_ids": [user], "candidates": [items]}).encode()


def test_pipelined_requests_are_answered_in_order_on_one_connection(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    users = [*model.user_ids[:6], 99999]
    with start_server(root) as srv:
        client = _Client(srv.url)
        client.send(b"".join(_post(_score_body(u, [1 + i, 2])) for i, u in enumerate(users)))
        for i, u in enumerate(users):
            status, headers, body = client.reply()
            assert status == 200, body
            want, cold = model.expected(np.array([u]), np.array([[1 + i, 2]]))
            doc = json.loads(body)
            np.testing.assert_allclose(doc["scores"][0], want[0], rtol=1e-5, atol=1e-6)
            assert doc["cold_start"] == cold.tolist()
            assert headers["x-model-version"] == model.model_version
        client.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")  # the connection is still open (keep-alive)
        assert client.reply()[0] == 200
        client.close()


def test_chunked_body_and_expect_continue(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    body = _score_body(model.user_ids[0], [3, 4])
    with start_server(root) as srv:
        client = _Client(srv.url)
        head = "POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
        client.send(head.encode() + chunks + b"0\r\n\r\n")
        assert client.reply()[0] == 200
        client.send(_post(b"", extra="expect: 100-continue\r\n").replace(b"content-length: 0",
                                                                          b"content-length: %d" % len(body)))
        assert client.sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.send(body)
        status, _, reply = client.reply()
        assert status == 200, reply
        client.close()


@pytest.mark.parametrize(("request_bytes", "status", "field"), [
    (b"GARBAGE\r\n\r\n", 400, "http"),
    (b"GET /" + b"a" * (MAX_URL + 1) + b" HTTP/1.1\r\nhost: x\r\n\r\n", 414, "url"),
    (b"GET /healthz HTTP/1.1\r\n" + b"x-pad: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n", 431, "headers"),
    (b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 99999\r\n\r\n",
     413, "body"),
    (b"POST /score HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\ncontent-length: 0\r\n\r\n",
     400, "upgrade"),
    (b"GET http:// HTTP/1.1\r\nhost: x\r\n\r\n", 400, "url"),  # llhttp takes these URLs, httptools' parser not
    (b"GET http://x:99999/healthz HTTP/1.1\r\nhost: x\r\n\r\n", 400, "url"),
    (b"GET http://x HTTP/1.1\r\nhost: x\r\n\r\n", 400, "url"),  # an absolute URL without a path
    (b"POST http://x?dense_ids=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", 400, "url"),
])
def test_fatal_requests_get_a_reply_and_the_connection_closes(published: tuple[ModelStore, Path], request_bytes: bytes,
                                                              status: int, field: str) -> None:
    _, root = published
    with start_server(root, max_body_bytes=4096) as srv:
        client = _Client(srv.url)
        client.send(request_bytes)
        got, headers, body = client.reply()
        assert (got, json.loads(body)["field"]) == (status, field), body
        assert headers["connection"] == "close"
        assert client.closed()
        client.close()
        other = _Client(srv.url)  # the server itself is fine
        other.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert other.reply()[0] == 200
        other.close()


def test_a_header_that_never_ends_is_refused_as_it_arrives(published: tuple[ModelStore, Path]) -> None:
    """httptools hands a header over only once complete: the server counts the bytes of an unfinished head and
    answers 431 within a few hundred KiB, not after the client has streamed all it wants."""
    _, root = published
    with start_server(root) as srv:
        client = _Client(srv.url)
        sent = _flood(client, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: ")
        got, _, body = client.reply()
        assert got == 431 and json.loads(body)["field"] == "headers" and sent < (4 << 20)
        client.close()


def test_chunked_body_over_the_limit_is_refused_as_it_arrives(published: tuple[ModelStore, Path]) -> None:
    _, root = published
    with start_server(root, max_body_bytes=1024) as srv:
        client = _Client(srv.url)
        client.send(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + b"400\r\n" + b" " * 1024 + b"\r\n" + b"1\r\n \r\n")
        status, _, body = client.reply()
        assert (status, json.loads(body)["field"]) == (413, "body")
        assert client.closed()
        client.close()


def test_routes_methods_and_http10(published: tuple[ModelStore, Path]) -> None:
    _, root = published
    with start_server(root) as srv:
        client = _Client(srv.url)
        client.send(b"GET /score HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, body = client.reply()
        assert (status, headers["allow"], json.loads(body)["field"]) == (405, "POST", "method")
        client.send(b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        assert client.reply()[0] == 405
        client.send(b"GET /nowhere?x=1 HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _, body = client.reply()
        assert (status, json.loads(body)["field"]) == (404, "path")
        client.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, body = client.reply()
        assert status == 200 and headers["content-type"].startswith("text/plain") and b"ckv_requests_total" in body
        client.close()
        old = _Client(srv.url)  # HTTP/1.0 without keep-alive: one reply, then the server closes
        old.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = old.reply()
        assert status == 200 and headers["connection"] == "close"
        assert old.closed()
        old.close()


def test_shutdown_answers_requests_read_and_closes_idle_connections(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    srv = start_server(root, max_wait_ms=300.0)  # requests wait in the batcher while the server stops
    busy, idle = _Client(srv.url), _Client(srv.url)
    idle.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert idle.reply()[0] == 200
    busy.send(_post(_score_body(model.user_ids[1], [5])))
    srv.stop()
    status, _, body = busy.reply()
    assert status == 200 and json.loads(body)["model_version"] == model.model_version
    assert busy.closed() and idle.closed()
    busy.close()
    idle.close()


def test_encode_frames_the_reply() -> None:
    data = encode(Reply(503, b'{"a":1}', "application/json", (("retry-after", "1"),)), close=True)
    head, body = data.split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable" and body == b'{"a":1}'
    want = {b"content-length: 7", b"retry-after: 1", b"connection: close", b"content-type: application/json"}
    assert want <= set(lines)
    assert any(line.startswith(b"date: ") for line in lines)


def test_a_flood_of_pipelined_requests_is_answered_in_order(published: tuple[ModelStore, Path]) -> None:
    """More unanswered requests than MAX_PIPELINED, sent before any reply is read: reading pauses and resumes,
    and every reply arrives, in order."""
    _, root = published
    with start_server(root) as srv:
        client = _Client(srv.url)
        paths = [("/healthz", 200) if i % 3 else ("/nowhere", 404) for i in range(3 * MAX_PIPELINED)]
        client.send(b"".join(f"GET {p} HTTP/1.1\r\nhost: x\r\n\r\n".encode() for p, _ in paths))
        assert [client.reply()[0] for _ in paths] == [status for _, status in paths]
        client.close()


def test_a_chunked_trailer_that_never_ends_is_refused_as_it_arrives(published: tuple[ModelStore, Path]) -> None:
    """httptools buffers a trailer field whole, like a header: its bytes are bounded as they arrive."""
    _, root = published
    with start_server(root) as srv:
        client = _Client(srv.url)
        sent = _flood(client, b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                              b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-trailer: ")
        got, _, body = client.reply()
        assert got == 431 and json.loads(body)["field"] == "headers" and sent < (4 << 20)
        client.close()
        metrics = _Client(srv.url)  # a refusal of a request read in part is counted with the replies
        metrics.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b'ckv_requests_total{status="431"} 1.0' in metrics.reply()[2]
        metrics.close()


def test_keepalive_counts_from_the_last_reply(published: tuple[ModelStore, Path]) -> None:
    """A reply slower than keepalive_s leaves the connection open for keepalive_s after it is written."""
    model, root = published
    with start_server(root, max_wait_ms=2500.0, keepalive_s=1.5) as srv:
        client = _Client(srv.url)
        client.send(_post(_score_body(model.user_ids[0], [1])))  # the batcher holds it 2.5 s
        assert client.reply()[0] == 200
        time.sleep(1.2)  # the sweep (once a second) has run at least once since the reply
        client.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert client.reply()[0] == 200
        client.close()


def test_a_head_trickled_byte_by_byte_is_closed_after_header_timeout(published: tuple[ModelStore, Path]) -> None:
    _, root = published
    with start_server(root, header_timeout_s=1.0) as srv:
        client = _Client(srv.url)
        t0 = time.monotonic()
        client.send(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        try:
            while time.monotonic() - t0 < 8.0 and not closed:
                client.send(b"x")  # a header name that never ends, a byte every 0.2 s
                client.sock.settimeout(0.2)
                with contextlib.suppress(TimeoutError):
                    closed = client.sock.recv(1) == b""
        except OSError:  # reset: closed
            closed = True
        assert closed and time.monotonic() - t0 < 4.0
        client.close()


def test_expect_continue_waits_for_the_earlier_pipelined_replies(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    body = _score_body(model.user_ids[0], [3])
    with start_server(root, max_wait_ms=300.0) as srv:
        client = _Client(srv.url)
        head = _post(b"", extra="expect: 100-continue\r\n").replace(b"content-length: 0",
                                                                   b"content-length: %d" % len(body))
        client.send(_post(_score_body(model.user_ids[1], [2])) + head)  # the first waits 300 ms in the batcher
        assert client.reply()[0] == 200
        while len(client.buf) < 25:
            assert client._fill()
        assert client.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.buf = client.buf[25:]
        client.send(body)
        assert client.reply()[0] == 200
        client.close()


def test_healthz_is_503_while_draining(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    srv = start_server(root, max_wait_ms=1500.0)
    client = _Client(srv.url)
    client.send(_post(_score_body(model.user_ids[0], [1])))  # in the batcher while the server stops
    time.sleep(0.3)
    stopping = threading.Thread(target=srv.stop)
    stopping.start()
    time.sleep(0.3)
    client.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert client.reply()[0] == 200
    status, headers, body = client.reply()
    assert (status, json.loads(body)["status"], headers["connection"]) == (503, "draining", "close")
    stopping.join()
    client.close()


def test_a_refusal_behind_a_slow_reply_keeps_both_replies(published: tuple[ModelStore, Path]) -> None:
    """A 431 of an unfinished head, due after a reply the batcher holds longer than header_timeout_s: nothing more
    is read, so no head deadline runs; both replies arrive, in order."""
    model, root = published
    with start_server(root, max_wait_ms=2500.0, header_timeout_s=1.0) as srv:
        client = _Client(srv.url)
        client.send(_post(_score_body(model.user_ids[0], [1]))
                    + b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 40000 + b"\r\nx-more: ")
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            client.send(b"b\r\n\r\n")
        assert [client.reply()[0], client.reply()[0]] == [200, 431]
        client.close()


def test_a_head_split_while_reading_is_paused_is_not_timed_out(published: tuple[ModelStore, Path]) -> None:
    """More than MAX_PIPELINED slow requests, the next head cut in two: reading pauses with the head half read
    for longer than header_timeout_s, and the head clock does not run while it is paused."""
    model, root = published
    with start_server(root, max_wait_ms=2500.0, header_timeout_s=1.0) as srv:
        client = _Client(srv.url)
        flood = b"".join(_post(_score_body(model.user_ids[0], [1 + i % 5])) for i in range(MAX_PIPELINED + 2))
        client.send(flood + b"GET /healthz HTTP/1.1\r\nho")
        time.sleep(0.3)
        client.send(b"st: x\r\n\r\n")
        assert [client.reply()[0] for _ in range(MAX_PIPELINED + 3)] == [200] * (MAX_PIPELINED + 3)
        client.close()


@pytest.mark.parametrize(("head", "status", "field"), [
    (b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: text/csv\r\n", 415, "content-type"),
    (b"POST /nowhere HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n", 404, "path"),
    (b"PUT /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n", 405, "method"),
    (b"POST /score?dense_ids=maybe HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n", 400, "dense_ids"),
])
def test_expect_continue_of_a_refused_request_gets_its_status_at_once(published: tuple[ModelStore, Path], head: bytes,
                                                                      status: int, field: str) -> None:
    """No 100 for a request its head already refuses: the final status, and the connection closes (the client,
    told not to, sends no body)."""
    _, root = published
    with start_server(root) as srv:
        client = _Client(srv.url)
        client.send(head + b"content-length: 100\r\nexpect: 100-continue\r\n\r\n")
        got, headers, body = client.reply()
        assert (got, json.loads(body)["field"], headers["connection"]) == (status, field, "close")
        assert client.closed()
        client.close()


def _open_connections(srv: RunningServer) -> list[http._Connection]:
    """The connections ``srv`` still holds (other tests' servers may keep theirs past their loop's end)."""
    return [o for o in gc.get_objects()
            if type(o) is http._Connection and o.server.sock is srv.sock and o in o.server.connections]


def test_a_client_that_reads_no_reply_is_aborted_after_keepalive(published: tuple[ModelStore, Path]) -> None:
    """Replies piled up unread: a close would wait for the client forever; the sweep aborts the connection (after
    keepalive_s, or header_timeout_s when reading paused inside a request)."""
    _, root = published
    with start_server(root, keepalive_s=1.0, header_timeout_s=1.0) as srv:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n" * 3000)
        deadline = time.monotonic() + 60.0
        while not _open_connections(srv) and time.monotonic() < deadline:  # accepted late on a loaded machine
            time.sleep(0.05)
        while _open_connections(srv) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _open_connections(srv)
        sock.close()


def _unread_flood(srv: RunningServer, n: int) -> socket.socket:
    """A connection that sends ``n`` pipelined ``GET /metrics`` at once and reads nothing yet; small socket buffers on
    both ends (the server's accepted socket inherits its listening socket's) so replies pile up in the server."""
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.settimeout(10)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n" * n)
    time.sleep(0.5)
    return sock


def _count_replies(sock: socket.socket, n: int) -> int:
    """Read until ``n`` replies (or the server closes); how many arrived."""
    replies, buf = 0, b""
    while replies < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
        replies, buf = replies + buf.count(b"HTTP/1.1 200 OK\r\n"), buf[-16:]  # shorter than the marker
    return replies


def test_one_read_of_many_small_requests_is_parsed_only_as_far_as_replies_may_wait(
        published: tuple[ModelStore, Path]) -> None:
    """3,000 pipelined ``GET /metrics`` (~100 KiB, arriving in one or a few reads), none of their replies read: parsing
    stops within a piece of where reading pauses, the rest of the read kept, so the replies buffered stay a small part
    of all 3,000; every reply then arrives, in order, once the client reads."""
    _, root = published
    with start_server(root) as srv:
        sock = _unread_flood(srv, 3000)
        (conn,) = _open_connections(srv)
        buffered, held = conn.transport.get_write_buffer_size(), len(conn.held)  # type: ignore[union-attr]
        assert _count_replies(sock, 3000) == 3000
        sock.close()
    one_reply = len(encode(srv.service.metrics_text(), False))
    assert held > 0 and buffered < 300 * one_reply, (held, buffered, one_reply)


def test_shutdown_answers_the_requests_read_but_not_parsed_yet(published: tuple[ModelStore, Path]) -> None:
    """A graceful stop while a read's requests wait unparsed (reading paused): they are parsed and answered before
    the connection closes, as every request already read is."""
    _, root = published
    srv = start_server(root)
    sock = _unread_flood(srv, 3000)
    (conn,) = _open_connections(srv)
    assert conn.held
    stopping = threading.Thread(target=srv.stop)
    stopping.start()
    time.sleep(0.2)
    assert _count_replies(sock, 3000) == 3000
    stopping.join()
    sock.close()


def test_head_replies_carry_no_body_and_trailers_are_not_headers(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    body = _score_body(model.user_ids[0], [3])
    with start_server(root) as srv:
        client = _Client(srv.url)
        client.send(b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        while b"\r\n\r\n" not in client.buf:
            assert client._fill()
        head, client.buf = client.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 405") and b"allow: GET" in head  # its head only: the next reply follows
        assert client.reply()[0] == 200
        client.send(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked"
                    b"\r\n\r\n%x\r\n%s\r\n0\r\ncontent-type: text/csv\r\n\r\n" % (len(body), body))
        assert client.reply()[0] == 200  # the trailer's content-type changes nothing
        client.close()


def test_expect_continue_counts_and_urls_as_without_it(published: tuple[ModelStore, Path]) -> None:
    """A URL without a path gets 100 and then 400 naming url, as without Expect; a 404 answered at once is not a
    POST /score reply (not counted), a 415 is counted once."""
    _, root = published
    with start_server(root) as srv:
        client = _Client(srv.url)
        client.send(b"POST http://x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
        assert client.sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"{}")
        got, _, reply = client.reply()
        assert (got, json.loads(reply)["field"]) == (400, "url")
        client.close()
        for head in (b"POST /nowhere HTTP/1.1\r\n", b"POST /score HTTP/1.1\r\ncontent-type: text/csv\r\n"):
            client = _Client(srv.url)
            client.send(head + b"host: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
            assert client.reply()[0] in (404, 415)
            client.close()
        metrics = _Client(srv.url)
        metrics.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        text = metrics.reply()[2]
        assert b'ckv_requests_total{status="415"} 1.0' in text and b'status="404"' not in text
        metrics.close()
