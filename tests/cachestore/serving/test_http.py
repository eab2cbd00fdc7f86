"""HTTP/1.1 of `ckv serve` (cachestore/serving/http.py) from raw sockets on 127.0.0.1, requests and their replies on
one connection: keep-alive, pipelined replies in request order (also past MAX_PIPELINED), chunked bodies,
Expect: 100-continue, routes and methods, HTTP/1.0, HEAD replies, trailers, and the framing of a reply.
(Limits, timeouts, slow clients and shutdown: test_http_connections.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from collectivekv.cachestore.serving.app import Reply
from collectivekv.cachestore.serving.http import MAX_PIPELINED
from collectivekv.cachestore.serving.wire import encode
from tests.cachestore.serving.raw_http import RawClient, post_request, score_body
from tests.server_fixtures import ModelStore, start_server


def test_pipelined_requests_are_answered_in_order_on_one_connection(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    users = [*model.user_ids[:6], 99999]
    with start_server(root) as srv:
        client = RawClient(srv.url)
        client.send(b"".join(post_request(score_body(u, [1 + i, 2])) for i, u in enumerate(users)))
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
    body = score_body(model.user_ids[0], [3, 4])
    with start_server(root) as srv:
        client = RawClient(srv.url)
        head = "POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
        client.send(head.encode() + chunks + b"0\r\n\r\n")
        assert client.reply()[0] == 200
        client.send(post_request(b"", extra="expect: 100-continue\r\n").replace(b"content-length: 0",
                                                                          b"content-length: %d" % len(body)))
        assert client.sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.send(body)
        status, _, reply = client.reply()
        assert status == 200, reply
        client.close()


def test_routes_methods_and_http10(published: tuple[ModelStore, Path]) -> None:
    _, root = published
    with start_server(root) as srv:
        client = RawClient(srv.url)
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
        old = RawClient(srv.url)  # HTTP/1.0 without keep-alive: one reply, then the server closes
        old.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = old.reply()
        assert status == 200 and headers["connection"] == "close"
        assert old.closed()
        old.close()


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
        client = RawClient(srv.url)
        paths = [("/healthz", 200) if i % 3 else ("/nowhere", 404) for i in range(3 * MAX_PIPELINED)]
        client.send(b"".join(f"GET {p} HTTP/1.1\r\nhost: x\r\n\r\n".encode() for p, _ in paths))
        assert [client.reply()[0] for _ in paths] == [status for _, status in paths]
        client.close()


def test_expect_continue_waits_for_the_earlier_pipelined_replies(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    body = score_body(model.user_ids[0], [3])
    with start_server(root, max_wait_ms=300.0) as srv:
        client = RawClient(srv.url)
        head = post_request(b"", extra="expect: 100-continue\r\n").replace(b"content-length: 0",
                                                                   b"content-length: %d" % len(body))
        client.send(post_request(score_body(model.user_ids[1], [2])) + head)  # the first waits 300 ms in the batcher
        assert client.reply()[0] == 200
        while len(client.buf) < 25:
            assert client.fill()
        assert client.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.buf = client.buf[25:]
        client.send(body)
        assert client.reply()[0] == 200
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
        client = RawClient(srv.url)
        client.send(head + b"content-length: 100\r\nexpect: 100-continue\r\n\r\n")
        got, headers, body = client.reply()
        assert (got, json.loads(body)["field"], headers["connection"]) == (status, field, "close")
        assert client.closed()
        client.close()


def test_head_replies_carry_no_body_and_trailers_are_not_headers(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    body = score_body(model.user_ids[0], [3])
    with start_server(root) as srv:
        client = RawClient(srv.url)
        client.send(b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        while b"\r\n\r\n" not in client.buf:
            assert client.fill()
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
        client = RawClient(srv.url)
        client.send(b"POST http://x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
        assert client.sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"{}")
        got, _, reply = client.reply()
        assert (got, json.loads(reply)["field"]) == (400, "url")
        client.close()
        for head in (b"POST /nowhere HTTP/1.1\r\n", b"POST /score HTTP/1.1\r\ncontent-type: text/csv\r\n"):
            client = RawClient(srv.url)
            client.send(head + b"host: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
            assert client.reply()[0] in (404, 415)
            client.close()
        metrics = RawClient(srv.url)
        metrics.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        text = metrics.reply()[2]
        assert b'ckv_requests_total{status="415"} 1.0' in text and b'status="404"' not in text
        metrics.close()
