"""HTTP/1.1 of `ckv serve` (cachestore/serving/http.py) from raw sockets on 127.0.0.1, how connections end: fatal
requests (malformed, the URL / header / body limits) get a reply and the connection closes; a header, trailer or
chunked body over its limit is refused as it arrives; keep-alive and header timeouts; a client that reads no reply
is aborted, and a read's requests are parsed only as far as replies may wait; a graceful shutdown answers every
request already read and closes idle connections."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from collectivekv.cachestore.serving import http
from collectivekv.cachestore.serving.http import MAX_HEADER_BYTES, MAX_PIPELINED, MAX_URL
from collectivekv.cachestore.serving.server import RunningServer
from collectivekv.cachestore.serving.wire import encode
from tests.cachestore.serving.raw_http import RawClient, post_request, score_body
from tests.server_fixtures import ModelStore, start_server


def _flood(client: RawClient, start: bytes) -> int:
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
        client = RawClient(srv.url)
        client.send(request_bytes)
        got, headers, body = client.reply()
        assert (got, json.loads(body)["field"]) == (status, field), body
        assert headers["connection"] == "close"
        assert client.closed()
        client.close()
        other = RawClient(srv.url)  # the server itself is fine
        other.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert other.reply()[0] == 200
        other.close()


def test_a_header_that_never_ends_is_refused_as_it_arrives(published: tuple[ModelStore, Path]) -> None:
    """httptools hands a header over only once complete: the server counts the bytes of an unfinished head and
    answers 431 within a few hundred KiB, not after the client has streamed all it wants."""
    _, root = published
    with start_server(root) as srv:
        client = RawClient(srv.url)
        sent = _flood(client, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: ")
        got, _, body = client.reply()
        assert got == 431 and json.loads(body)["field"] == "headers" and sent < (4 << 20)
        client.close()


def test_chunked_body_over_the_limit_is_refused_as_it_arrives(published: tuple[ModelStore, Path]) -> None:
    _, root = published
    with start_server(root, max_body_bytes=1024) as srv:
        client = RawClient(srv.url)
        client.send(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + b"400\r\n" + b" " * 1024 + b"\r\n" + b"1\r\n \r\n")
        status, _, body = client.reply()
        assert (status, json.loads(body)["field"]) == (413, "body")
        assert client.closed()
        client.close()


def test_shutdown_answers_requests_read_and_closes_idle_connections(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    srv = start_server(root, max_wait_ms=300.0)  # requests wait in the batcher while the server stops
    busy, idle = RawClient(srv.url), RawClient(srv.url)
    idle.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert idle.reply()[0] == 200
    busy.send(post_request(score_body(model.user_ids[1], [5])))
    srv.stop()
    status, _, body = busy.reply()
    assert status == 200 and json.loads(body)["model_version"] == model.model_version
    assert busy.closed() and idle.closed()
    busy.close()
    idle.close()


def test_a_chunked_trailer_that_never_ends_is_refused_as_it_arrives(published: tuple[ModelStore, Path]) -> None:
    """httptools buffers a trailer field whole, like a header: its bytes are bounded as they arrive."""
    _, root = published
    with start_server(root) as srv:
        client = RawClient(srv.url)
        sent = _flood(client, b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                              b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-trailer: ")
        got, _, body = client.reply()
        assert got == 431 and json.loads(body)["field"] == "headers" and sent < (4 << 20)
        client.close()
        metrics = RawClient(srv.url)  # a refusal of a request read in part is counted with the replies
        metrics.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b'ckv_requests_total{status="431"} 1.0' in metrics.reply()[2]
        metrics.close()


def test_keepalive_counts_from_the_last_reply(published: tuple[ModelStore, Path]) -> None:
    """A reply slower than keepalive_s leaves the connection open for keepalive_s after it is written."""
    model, root = published
    with start_server(root, max_wait_ms=2500.0, keepalive_s=1.5) as srv:
        client = RawClient(srv.url)
        client.send(post_request(score_body(model.user_ids[0], [1])))  # the batcher holds it 2.5 s
        assert client.reply()[0] == 200
        time.sleep(1.2)  # the sweep (once a second) has run at least once since the reply
        client.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert client.reply()[0] == 200
        client.close()


def test_a_head_trickled_byte_by_byte_is_closed_after_header_timeout(published: tuple[ModelStore, Path]) -> None:
    _, root = published
    with start_server(root, header_timeout_s=1.0) as srv:
        client = RawClient(srv.url)
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


def test_healthz_is_503_while_draining(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    srv = start_server(root, max_wait_ms=1500.0)
    client = RawClient(srv.url)
    client.send(post_request(score_body(model.user_ids[0], [1])))  # in the batcher while the server stops
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
        client = RawClient(srv.url)
        client.send(post_request(score_body(model.user_ids[0], [1]))
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
        client = RawClient(srv.url)
        flood = b"".join(post_request(score_body(model.user_ids[0], [1 + i % 5])) for i in range(MAX_PIPELINED + 2))
        client.send(flood + b"GET /healthz HTTP/1.1\r\nho")
        time.sleep(0.3)
        client.send(b"st: x\r\n\r\n")
        assert [client.reply()[0] for _ in range(MAX_PIPELINED + 3)] == [200] * (MAX_PIPELINED + 3)
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
