"""Several serving processes on one port (``ckv serve --workers N``), and the supervisor that keeps them.

One Python process tops out on its event loop (HTTP, JSON, futures: one thread under the GIL), long before
the GPU does for small requests. So ``--workers N`` runs N whole servers (:mod:`cachestore.serving.server`:
each its own runtime, resident tier, batcher and version follower) behind one port:

- The supervisor holds the port with a bound, non-listening ``SO_REUSEPORT`` socket (port 0 becomes a
  real port here) and sets ``PROMETHEUS_MULTIPROC_DIR`` to a private directory, so ``GET /metrics`` on any
  worker reports the sums over all of them (:mod:`cachestore.serving.metrics`).
- Workers start one after another (``spawn``: a CUDA process cannot be forked): worker k loads the current
  version, opens its own listening ``SO_REUSEPORT`` socket on the port and reports ready before worker
  k+1 starts. On CUDA each therefore sees the device memory the ones before it left, and its auto tier
  takes 1/(N-k) of that budget (``ServingConfig.tier_share``). The kernel spreads new connections over
  the listening sockets.
- Every reply names the version that scored it; workers follow ``STORE/current`` independently, so
  during a publish some replies come from the old version and some from the new, never one from both.
- SIGTERM / SIGINT: forwarded to every worker (each drains its queue, as one server does), waited for;
  the supervisor then exits 0. A worker that exits on its own is logged, marked dead for the metrics and
  started again; more than ``MAX_RESTARTS`` restarts within ``RESTART_WINDOW_S`` stop the whole server.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.metrics import MULTIPROC_ENV

log = logging.getLogger("ckv.serve")
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
_READY_TIMEOUT_S = 600.0  # loading a version (model, pools, LMDB, warming the tier) takes at most this


class WorkerFailed(RuntimeError):
    """A worker could not start (its load error is the message), or workers kept dying."""


def _exit_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies (a killed supervisor leaves no orphan serving)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(config: ServerConfig, conn: Connection) -> None:
    """One worker: load, listen on the shared port, report ready, serve until SIGTERM / SIGINT."""
    import faulthandler
    import gc

    _exit_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to stderr
    from collectivekv.cachestore.serving.server import bind, build_service, configure_process, serve

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(name)s[{os.getpid()}] %(levelname)s %(message)s")
    configure_process(config)
    try:
        service = build_service(config)
    except Exception as exc:  # reported to the supervisor, which names it in one line
        conn.send({"error": f"cannot serve the current version: {exc}"})
        raise SystemExit(1) from None
    try:
        sock = bind(config.host, config.port, reuse_port=True)
    except OSError as exc:
        service.close()
        conn.send({"error": f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"})
        raise SystemExit(1) from None
    active = service.versions.active
    conn.send({"ready": True, "pid": os.getpid(), "store_version": active.store_version,
               "model_version": active.model_version})
    conn.close()
    gc.freeze()  # what loading allocated is never collected: the collector's full passes stay short
    serve(service, sock)


class Supervisor:
    """Start, watch, restart and stop the workers of one port (module docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        from collectivekv.cachestore.serving.server import bind

        self._holder = bind(config.host, config.port, reuse_port=True, listen=False)
        self.config = dataclasses.replace(config, port=self._holder.getsockname()[1])
        self._metrics_dir = tempfile.mkdtemp(prefix="ckv-metrics-")
        os.environ[MULTIPROC_ENV] = self._metrics_dir  # inherited by the spawned workers
        self._ctx = mp.get_context("spawn")
        self._workers: list[mp.process.BaseProcess | None] = [None] * config.workers
        self._restarts: list[float] = []
        self._stop = threading.Event()
        self.ready: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        from collectivekv.cachestore.serving.server import url_of

        return url_of(self._holder)

    def _start(self, index: int, share: float) -> dict[str, Any]:
        """Start worker ``index`` and wait until it listens; WorkerFailed with its error otherwise."""
        runtime = self.config.runtime.replace(tier_share=share)
        parent, child = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_worker_main, args=(dataclasses.replace(self.config, runtime=runtime), child),
                                 name=f"ckv-serve-{index}", daemon=False)
        proc.start()
        child.close()
        self._workers[index] = proc
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not parent.poll(0.2):  # in slices: a SIGTERM while a worker loads stops it at once
            if self._stop.is_set() or time.monotonic() > deadline:
                proc.kill()
                proc.join()
                why = "the server was asked to stop" if self._stop.is_set() else f"{_READY_TIMEOUT_S:.0f} s passed"
                raise WorkerFailed(f"worker {index} did not start: {why}")
        try:
            msg = parent.recv()
        except EOFError:
            proc.join()
            raise WorkerFailed(f"worker {index} exited with status {proc.exitcode} while loading") from None
        if "error" in msg:
            proc.join()
            raise WorkerFailed(msg["error"])
        return msg

    def start(self) -> dict[str, Any]:
        """Start every worker, one after another; the ready line (URL, versions, pids). On a failure the
        workers already started are stopped and WorkerFailed is raised."""
        n = len(self._workers)
        try:
            self.ready = [self._start(k, 1.0 / (n - k)) for k in range(n)]
        except BaseException:
            self.stop()
            raise
        first = self.ready[0]
        return {"listening": self.url, "store_version": first["store_version"],
                "model_version": first["model_version"], "workers": [w["pid"] for w in self.ready]}

    def request_stop(self, *_: object) -> None:
        """Signal handler: the watch loop stops the workers."""
        self._stop.set()

    def _restart(self, index: int, exitcode: int | None) -> None:
        """Start worker ``index`` again (after it exited with ``exitcode``), backing off 1, 2, 4 … s between
        attempts; a start that fails counts as one more exit. Beyond MAX_RESTARTS within RESTART_WINDOW_S the
        slot is left empty while other workers serve (WorkerFailed when none does)."""
        from prometheus_client import multiprocess

        attempt = 0
        while not self._stop.is_set():
            proc = self._workers[index]
            multiprocess.mark_process_dead(proc.pid, self._metrics_dir)
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                why = (f"workers exited {len(self._restarts)} times within {RESTART_WINDOW_S:.0f} s; the last: "
                       f"worker {index}, status {exitcode}")
                self._workers[index] = None
                if not any(p is not None and p.is_alive() for p in self._workers):
                    raise WorkerFailed(why)
                log.error("%s: worker %d is not started again, the others keep serving", why, index)
                return
            log.error("worker %d (pid %d) exited with status %s; starting it again", index, proc.pid, exitcode)
            if attempt and self._stop.wait(min(2.0 ** (attempt - 1), 30.0)):
                return
            attempt += 1
            try:
                self._start(index, 1.0)  # the others hold their memory already: it takes what they left
                return
            except WorkerFailed as exc:
                exitcode = f"{self._workers[index].exitcode} ({exc})"

    def watch(self) -> None:
        """Until request_stop: restart workers that exit on their own (WorkerFailed when they keep dying)."""
        while not self._stop.is_set():
            live = {p.sentinel: k for k, p in enumerate(self._workers) if p is not None}
            for sentinel in wait(list(live), timeout=0.2):
                k = live[sentinel]
                self._workers[k].join()
                if not self._stop.is_set():
                    self._restart(k, self._workers[k].exitcode)

    def stop(self) -> int:
        """SIGTERM every worker (graceful drain), wait for them, free the port and the metrics directory.
        Returns 0 when every worker exited cleanly (a serving worker drains and exits 0; one still loading
        ends by the signal, with nothing in flight), else 1."""
        procs = [p for p in self._workers if p is not None]
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        grace = self.config.request_timeout_s + 30
        status = 0
        for p in procs:
            p.join(grace)
            if p.is_alive():
                log.error("worker pid %d did not stop within %.0f s: killed", p.pid, grace)
                p.kill()
                p.join()
            status |= int(p.exitcode not in (0, -signal.SIGTERM))  # -SIGTERM: stopped while loading
        self._workers = [None] * len(self._workers)
        self._holder.close()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)
        return status


def serve_workers(config: ServerConfig, announce: Any) -> int:
    """Run ``config.workers`` workers until SIGTERM / SIGINT; ``announce(ready_line)`` once all listen.
    Returns the exit status (0: every worker drained and exited cleanly). Main thread only."""
    sup = Supervisor(config)
    previous = {sig: signal.signal(sig, sup.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        announce(sup.start())
        try:
            sup.watch()
        except WorkerFailed as exc:
            log.error("%s: stopping", exc)
            sup.stop()
            raise
        return sup.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
