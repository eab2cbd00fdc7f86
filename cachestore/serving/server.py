"""Run the serving process: uvicorn on one bound socket, one :class:`ScoringService` behind it.

:func:`serve` blocks in the main thread (``ckv serve``): SIGTERM / SIGINT start a graceful shutdown —
uvicorn stops accepting, lets every in-flight request finish (they wait on the batcher, which keeps
scoring), then the app's shutdown drains whatever is still queued and releases the store.
:class:`RunningServer` runs the same server in a background thread (tests, benchmarks): ``stop()``
is the same graceful shutdown.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import uvicorn

from collectivekv.cachestore.serving.app import ScoringService, create_app
from collectivekv.cachestore.serving.batcher import DynamicBatcher
from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.metrics import ServerMetrics
from collectivekv.cachestore.serving.versions import Loader, VersionManager


def configure_process(config: ServerConfig) -> None:
    """Process-wide settings of a serving process: torch's intra-op threads (``config.torch_threads``)."""
    import torch

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


class _Server(uvicorn.Server):
    """uvicorn's server that also honours a SIGTERM / SIGINT caught before uvicorn installed its own
    handlers (``exit_requested``, set by :func:`serve`'s early handler): it shuts down right after startup
    instead of serving on with the signal lost."""

    exit_requested = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.exit_requested:
            self.should_exit = True


def _uvicorn(service: ScoringService) -> _Server:
    # proxy_headers off: no X-Forwarded-* rewriting per request (the server logs no client addresses)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="on",
                            proxy_headers=False,
                            timeout_graceful_shutdown=int(service.config.request_timeout_s) + 1, backlog=2048)
    return _Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(service: ScoringService, sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGTERM / SIGINT (graceful: the queue is drained), then release all and
    return normally (main thread only). uvicorn re-raises the signal it caught once it has shut down;
    the handlers installed here take that re-raise, so the process exits with status 0, not by the signal.
    A signal that arrives before uvicorn's handlers are in place is kept and honoured once it has started."""
    server = _uvicorn(service)

    def early(*_: object) -> None:
        server.exit_requested = True

    previous = {sig: signal.signal(sig, early) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
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
        self._server = _uvicorn(self.service)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]},
                                        name="ckv-uvicorn", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.01)

    def stop(self) -> None:
        """Graceful shutdown: in-flight and queued requests are scored, then everything is released."""
        self._server.should_exit = True
        self._thread.join()
        self.service.close()
        self.sock.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
