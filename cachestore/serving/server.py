"""Run the serving process: the HTTP server (:mod:`cachestore.serving.http`) on one bound socket, one
:class:`ScoringService` behind it.

:func:`serve` blocks in the main thread (``ckv serve``): SIGTERM / SIGINT start a graceful shutdown —
the server stops accepting, answers every request already read (they wait on the batcher, which keeps
scoring), then drains whatever is still queued and releases the store.
:class:`RunningServer` runs the same server in a background thread (tests, benchmarks): ``stop()``
is the same graceful shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from collectivekv.cachestore.serving.app import ScoringService
from collectivekv.cachestore.serving.batcher import DynamicBatcher
from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.http import HttpServer
from collectivekv.cachestore.serving.metrics import ServerMetrics
from collectivekv.cachestore.serving.versions import Loader, VersionManager


def configure_process(config: ServerConfig) -> None:
    """Process-wide settings of a serving process: torch's intra-op threads (``config.torch_threads``) and how
    soon a thread waiting for the GIL takes it from a busy one (``config.gil_switch_ms``)."""
    import torch

    sys.setswitchinterval(config.gil_switch_ms / 1e3)
    if config.torch_threads is not None or config.runtime.torch_device.type == "cpu":
        torch.set_num_threads(config.torch_threads or 1)


def build_service(config: ServerConfig, loader: Loader | None = None) -> ScoringService:
    """Load the current version (errors propagate) and start the batcher's worker."""
    metrics = ServerMetrics()
    versions = VersionManager(Path(config.store), metrics, poll_s=config.poll_s, loader=loader,
                              runtime=config.runtime)
    versions.start()
    batcher = DynamicBatcher(versions, metrics, max_batch_users=config.max_batch_users,
                             max_wait_ms=config.max_wait_ms, max_queue_users=config.max_queue_users)
    batcher.start()
    return ScoringService(config, versions, batcher, metrics)


def bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening TCP socket (port 0: a free port, read it with ``getsockname()``).

    reuse_port: SO_REUSEPORT, so several processes' sockets share the port and the kernel spreads incoming
    connections over the listening ones. listen=False only binds: it holds the port (a bound socket that
    does not listen receives no connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    if not listen:
        return sock
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on a new event loop: uvloop's when installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(service: ScoringService, sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGTERM / SIGINT (graceful: the queue is drained), then release all and
    return normally, so the process exits with status 0 (main thread only). A signal that arrives before
    the event loop's handlers are in place is kept and honoured once it has started."""
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}

    async def main() -> None:
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        for sig in previous:
            loop.add_signal_handler(sig, stop.set)
        if caught:
            stop.set()
        try:
            await HttpServer(service, sock).run(stop)
        finally:
            for sig in previous:
                loop.remove_signal_handler(sig)

    gc.collect()
    gc.freeze()  # what is loaded now (torch, the model, the version) is never scanned again by the cyclic GC:
    # its full collections over them paused the event loop for tens of ms, enough to set the p99 under load
    try:
        run_loop(main())
    finally:
        service.close()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class RunningServer:
    """A server in a background thread on 127.0.0.1 (or config.host) — for tests and benchmarks."""

    def __init__(self, config: ServerConfig, loader: Loader | None = None) -> None:
        self.service = build_service(config, loader)
        try:
            self.sock = bind(config.host, config.port)
        except OSError:
            self.service.close()
            raise
        self.url = url_of(self.sock)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=run_loop, args=(self._main(),), name="ckv-http", daemon=True)
        self._thread.start()
        self._started.wait()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await HttpServer(self.service, self.sock).run(self._stop)

    def stop(self) -> None:
        """Graceful shutdown: in-flight and queued requests are scored, then everything is released."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
        self._thread.join()
        self.service.close()
        self.sock.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
