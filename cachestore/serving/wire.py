"""HTTP/1.1 on the wire for ``ckv serve`` (:mod:`cachestore.serving.http`): a :class:`~cachestore.serving.app.Reply`
as bytes, with Content-Length framing and a date header formatted once a second."""

from __future__ import annotations

import time
from email.utils import formatdate

from collectivekv.cachestore.serving.app import Reply

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 413: b"Content Too Large",
            414: b"URI Too Long", 415: b"Unsupported Media Type", 421: b"Misdirected Request",
            422: b"Unprocessable Content", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
            503: b"Service Unavailable"}
_date = [0, b""]  # (second, "date: ...\r\n") — formatted once a second


def _date_line() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[:] = [now, b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"]
    return _date[1]


def encode(reply: Reply, close: bool = False) -> bytes:
    """The bytes of ``reply`` on the wire (HTTP/1.1, Content-Length framing)."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (reply.status, _REASONS.get(reply.status, b"")), _date_line(),
             b"content-type: %s\r\ncontent-length: %d\r\n" % (reply.media.encode(), len(reply.body))]
    parts += [b"%s: %s\r\n" % (k.encode(), v.encode("latin-1")) for k, v in reply.headers]
    if close:
        parts.append(b"connection: close\r\n")
    parts += [b"\r\n", reply.body]
    return b"".join(parts)
