"""Settings of one serving process (`ckv serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from collectivekv.cachestore.decode.runtime_config import ServingConfig


@dataclass(frozen=True)
class ServerConfig:
    """Everything `ckv serve` is started with.

    store: the store root; the server serves ``STORE/current`` and follows it (``poll_s``).
    host / port: where the HTTP server listens (loopback by default; port 0 = a free port).
    max_batch_users / max_wait_ms: the dynamic batcher closes a device batch when it holds this many
    users, or this long after its first request arrived, whichever comes first (a request larger than
    ``max_batch_users`` is one batch on its own; the runtime splits it into its own steps).
    max_queue_users: users waiting in the queue at most; a request beyond it gets 503 (back off), one larger than
        it 413.
    max_request_users / max_candidates / max_body_bytes: limits of one request (413 beyond them).
    request_timeout_s: a request not scored by then gets 503 (the worker is stuck or overloaded).
    keepalive_s: an idle connection (no byte in, no reply out) is closed after this long.
    header_timeout_s: a request head must be complete this long after it began (however slowly its bytes come),
    and a body must not stall longer; else the connection is closed.
    poll_s: how often ``STORE/current`` is read for a new version.
    workers: serving processes on the port (:mod:`cachestore.serving.workers`); each has its own runtime,
    tier and batcher, and the kernel spreads the connections over them (SO_REUSEPORT).
    torch_threads: torch intra-op threads of a serving process (None: 1 on the CPU, where more threads
    contend with the HTTP loop and the other processes; torch's default on CUDA).
    gil_switch_ms: the interpreter's switch interval (``sys.setswitchinterval``): how long a thread waiting for
    the GIL lets the running one keep it before asking it to let go. With Python's 5 ms the scoring worker waits
    behind a busy event loop for up to 5 ms at each torch call (docs/serving.md, "One process").
    runtime: how each loaded version's runtime serves (:class:`cachestore.decode.runtime_config.ServingConfig`:
    device, decode path, batch_users, resident tier bytes and policy, graphs, ...).
    """

    store: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_users: int = 512
    max_wait_ms: float = 2.0
    max_queue_users: int = 1 << 16
    max_request_users: int = 8192
    max_candidates: int = 1024
    max_body_bytes: int = 64 << 20
    request_timeout_s: float = 30.0
    keepalive_s: float = 5.0
    header_timeout_s: float = 30.0
    poll_s: float = 1.0
    workers: int = 1
    torch_threads: int | None = None
    gil_switch_ms: float = 0.2
    runtime: ServingConfig = field(default_factory=ServingConfig)

    def __post_init__(self) -> None:
        for name in ("max_batch_users", "max_queue_users", "max_request_users", "max_candidates", "max_body_bytes",
                     "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "request_timeout_s", "poll_s", "keepalive_s", "header_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.gil_switch_ms > 0:
            raise ValueError(f"ServerConfig.gil_switch_ms must be > 0, got {self.gil_switch_ms}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"ServerConfig.torch_threads must be >= 1 or None, got {self.torch_threads}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be 0..65535, got {self.port}")
