"""A raw HTTP/1.1 client for the `ckv serve` protocol tests: bytes sent as they are, replies framed by
Content-Length; a POST request's bytes and a one-user /score body."""

from __future__ import annotations

import json
import socket


class RawClient:
    """A raw HTTP/1.1 client: send bytes, read replies framed by Content-Length."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> bool:
        """Read what has arrived into ``buf``; False when the server closed."""
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        """The next reply: status, headers (lower-case names), body; (0, {}, b"") when the server closed."""
        while b"\r\n\r\n" not in self.buf:
            if not self.fill():
                return 0, {}, b""
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
        while len(self.buf) < int(headers["content-length"]):
            assert self.fill(), "connection closed inside a body"
        n = int(headers["content-length"])
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        return not self.buf and not self.fill()

    def close(self) -> None:
        self.sock.close()


def post_request(body: bytes, path: str = "/score", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


def score_body(user: int, items: list[int]) -> bytes:
    return json.dumps({"user_ids": [user], "candidates": [items]}).encode()
