"""Load generator for `ckv serve`: open-loop HTTP/1.1 requests to 127.0.0.1 only, bounded in count and time.

:func:`run_load` sends request i at ``t0 + i / rate`` (open loop: a slow server does not slow the
arrivals; each request's task is created when it is due) over ``connections`` keep-alive connections
(asyncio streams, a minimal HTTP/1.1 client — lighter per request than a general client, so the
generator is not the bottleneck first), optionally from several forked generator processes; a request
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
    """Latencies (ms) of the completed requests and their scheduled times (``time.perf_counter()``, one clock for
    every process of the host), errors (status != 200 or I/O), versions seen, elapsed s."""

    offered_rps: float
    latencies_ms: list[float] = field(default_factory=list)
    scheduled_s: list[float] = field(default_factory=list)
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


async def _load(url: str | tuple[str, ...], bodies: Callable[[int], bytes], content_type: str, rate: float, n: int,
                t0: float, duration_s: float, connections: int, part: tuple[int, int],
                route: Callable[[int], int] | None = None) -> LoadResult:
    """Send requests i = part[0], part[0] + part[1], ... < n, request i at ``t0 + i / rate`` (to
    ``url[route(i)]`` when ``url`` is several servers)."""
    addresses = [loopback(u) for u in ((url,) if isinstance(url, str) else url)]
    pools: list[asyncio.Queue[_Connection]] = []
    for host, port in addresses:
        pools.append(asyncio.Queue())
        for _ in range(max(1, connections // len(addresses))):
            pools[-1].put_nowait(_Connection(*await asyncio.open_connection(host, port)))
    result = LoadResult(offered_rps=rate)
    n_bodies = min(n, 256 if route else 64)  # a few distinct bodies (and their servers), reused cyclically
    payloads = [bodies(i) for i in range(n_bodies)]
    targets = [route(i) if route else 0 for i in range(n_bodies)]

    async def one(i: int, t_sched: float) -> None:
        target = targets[i % n_bodies]
        pool, (host, port) = pools[target], addresses[target]
        conn = await pool.get()
        body = payloads[i % n_bodies]
        try:
            status, headers, _ = await conn.post(_head(host, port, "/score", content_type, len(body)), body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            result.errors += 1
            conn = _Connection(*await asyncio.open_connection(host, port))
        else:
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies_ms.append((time.perf_counter() - t_sched) * 1e3)
                result.scheduled_s.append(t_sched)
                v = headers.get("x-store-version", "")
                result.versions[v] = result.versions.get(v, 0) + 1
            else:
                result.errors += 1
        finally:
            pool.put_nowait(conn)

    # Tasks are created when they are due (not all up front: creating 100k tasks takes longer than the
    # first requests' schedule, which would count as latency); a late loop sends at once, and the delay
    # counts from the scheduled time.
    tasks = []
    for i in range(part[0], n, part[1]):
        t_sched = t0 + i / rate
        if (wait_s := t_sched - time.perf_counter()) > 0:
            await asyncio.sleep(wait_s)
        tasks.append(asyncio.create_task(one(i, t_sched)))
    result.sent = len(tasks)
    _, late = await asyncio.wait(tasks, timeout=max(1.0, t0 + duration_s + 60 - time.perf_counter()))
    for task in late:  # bounded in time: what has not finished by then is cancelled and counted
        task.cancel()
    result.errors += len(late)
    result.elapsed_s = time.perf_counter() - t0
    for pool in pools:
        while not pool.empty():
            pool.get_nowait().writer.close()
    return result


def _load_part(conn, args: tuple) -> None:  # noqa: ANN001 (a Connection of a forked generator process)
    r = asyncio.run(_load(*args))
    conn.send((r.latencies_ms, r.scheduled_s, r.errors, r.statuses, r.versions, r.sent, r.elapsed_s))
    conn.close()


def run_load(url: str | tuple[str, ...], bodies: Callable[[int], bytes], content_type: str, *, rate: float,
             duration_s: float, max_requests: int = 100_000, connections: int = 64, processes: int = 1,
             route: Callable[[int], int] | None = None) -> LoadResult:
    """Open-loop load at ``rate`` requests/s (module docstring); bodies(i) gives request i's body.

    Several servers (``url`` a tuple): request i goes to ``url[route(i)]`` (e.g. the process serving its
    user's shard), the connections split evenly over them.
    processes > 1: the schedule is dealt round-robin to that many forked generator processes (one Python
    event loop sends ~10k small requests/s at most), each with connections / processes connections;
    their results are merged."""
    n = min(max_requests, max(1, int(rate * duration_s)))
    if processes <= 1:
        t0 = time.perf_counter() + 0.05
        return asyncio.run(_load(url, bodies, content_type, rate, n, t0, duration_s, connections, (0, 1), route))
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children inherit `bodies` (a closure) and use no CUDA
    t0 = time.perf_counter() + 1.0  # CLOCK_MONOTONIC: one clock for every process on the host
    per = max(1, connections // processes)
    pipes, procs = [], []
    for k in range(processes):
        parent, child = ctx.Pipe(duplex=False)
        args = (url, bodies, content_type, rate, n, t0, duration_s, per, (k, processes), route)
        procs.append(ctx.Process(target=_load_part, args=(child, args), daemon=True))
        procs[-1].start()
        pipes.append(parent)
    out = LoadResult(offered_rps=rate)
    for parent, proc in zip(pipes, procs, strict=True):
        lat, scheduled, errors, statuses, versions, sent, elapsed = parent.recv()
        proc.join()
        out.latencies_ms += lat
        out.scheduled_s += scheduled
        out.errors += errors
        out.sent += sent
        out.elapsed_s = max(out.elapsed_s, elapsed)
        for k, v in statuses.items():
            out.statuses[k] = out.statuses.get(k, 0) + v
        for k, v in versions.items():
            out.versions[k] = out.versions.get(k, 0) + v
    return out


def get_json(url: str) -> dict:
    """GET a JSON document from a loopback URL (e.g. /healthz)."""
    import urllib.request

    loopback(url)
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback only, checked above)
        return json.loads(r.read())
