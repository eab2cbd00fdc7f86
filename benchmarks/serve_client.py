"""Load generator for `ckv serve`: open-loop HTTP/1.1 requests to 127.0.0.1 only, bounded in count and time.

:func:`run_load` sends request i at ``t0 + i / rate`` (open loop: a slow server does not slow the
arrivals) over ``connections`` keep-alive connections (asyncio streams, a minimal HTTP/1.1 client —
lighter per request than a general client, so the generator is not the bottleneck first); a request
whose connection is busy waits for one, and its latency counts from its scheduled time (no
coordinated omission). It stops after ``max_requests`` or ``duration_s``, whichever comes first.
Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


def loopback(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL on a loopback address; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or not ipaddress.ip_address(parts.hostname).is_loopback:
        raise ValueError(f"the load generator sends to 127.0.0.1 (loopback) only, not {url!r}")
    return parts.hostname, parts.port or 80


@dataclass
class LoadResult:
    """Latencies (ms) of the completed requests, errors (status != 200 or I/O), versions seen, elapsed s."""

    offered_rps: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    elapsed_s: float = 0.0

    def summary(self, users_per_request: int) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        done = len(self.latencies_ms)
        return {"offered_rps": self.offered_rps, "sent": self.sent, "ok": done, "errors": self.errors,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "achieved_rps": round(done / self.elapsed_s, 1) if self.elapsed_s else 0.0,
                "users_per_s": round(done * users_per_request / self.elapsed_s, 1) if self.elapsed_s else 0.0,
                "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "max_ms": round(float(lat.max()), 3), "versions": self.versions}


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        data = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers, data


def _head(host: str, port: int, path: str, content_type: str, n: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {n}\r\n\r\n").encode()


async def _load(url: str, bodies: Callable[[int], bytes], content_type: str, rate: float, duration_s: float,
                max_requests: int, connections: int) -> LoadResult:
    host, port = loopback(url)
    pool: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(_Connection(*await asyncio.open_connection(host, port)))
    result = LoadResult(offered_rps=rate)
    n = min(max_requests, max(1, int(rate * duration_s)))
    payloads = [bodies(i) for i in range(min(n, 64))]  # a few distinct bodies, reused cyclically

    async def one(i: int, t_sched: float) -> None:
        await asyncio.sleep(max(0.0, t_sched - time.perf_counter()))
        conn = await pool.get()
        body = payloads[i % len(payloads)]
        try:
            status, headers, _ = await conn.post(_head(host, port, "/score", content_type, len(body)), body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            result.errors += 1
            conn = _Connection(*await asyncio.open_connection(host, port))
        else:
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies_ms.append((time.perf_counter() - t_sched) * 1e3)
                v = headers.get("x-store-version", "")
                result.versions[v] = result.versions.get(v, 0) + 1
            else:
                result.errors += 1
        finally:
            pool.put_nowait(conn)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(i, t0 + i / rate)) for i in range(n)]
    result.sent = n
    _, late = await asyncio.wait(tasks, timeout=duration_s + 60)
    for task in late:  # bounded in time: what has not finished by then is cancelled and counted
        task.cancel()
    result.errors += len(late)
    result.elapsed_s = time.perf_counter() - t0
    while not pool.empty():
        pool.get_nowait().writer.close()
    return result


def run_load(url: str, bodies: Callable[[int], bytes], content_type: str, *, rate: float, duration_s: float,
             max_requests: int = 100_000, connections: int = 64) -> LoadResult:
    """Open-loop load at ``rate`` requests/s (module docstring); bodies(i) gives request i's body."""
    return asyncio.run(_load(url, bodies, content_type, rate, duration_s, max_requests, connections))


def get_json(url: str) -> dict:
    """GET a JSON document from a loopback URL (e.g. /healthz)."""
    import urllib.request

    loopback(url)
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback only, checked above)
        return json.loads(r.read())
