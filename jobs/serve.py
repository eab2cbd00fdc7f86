"""`ckv serve`: the serving process — an HTTP API on the cache store (cachestore/serving/).

Serves STORE/current (records and the checkpoint published with them by `ckv refresh`) and follows
it: a newly published version is loaded in the background and takes over between batches. Prints
one JSON line when listening ({"listening": URL, "store_version": …, "model_version": …}); logs to
stderr. The runtime options (--device, --path, --tier-bytes, --policy, --graphs, ...) are those of
``ckv score`` (jobs/serving_options.py). ``--workers N`` runs N serving processes on the port
(cachestore/serving/workers.py; the ready line then also lists their pids). SIGTERM / SIGINT: graceful
shutdown (queued and in-flight requests are scored first).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from collectivekv.jobs.serving_options import serving_options

if TYPE_CHECKING:
    from collectivekv.cachestore.decode.runtime_config import ServingConfig
    from collectivekv.cachestore.serving.config import ServerConfig


@click.command("serve")
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="cache store root: serves its current version and follows new publishes")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: a free port")
@serving_options
@click.option("--max-batch-users", default=512, show_default=True, type=click.IntRange(1),
              help="dynamic batcher: users per device batch at most")
@click.option("--max-wait-ms", default=2.0, show_default=True, type=click.FloatRange(0),
              help="dynamic batcher: how long a batch waits for more requests")
@click.option("--max-queue-users", default=1 << 16, show_default=True, type=click.IntRange(1),
              help="users queued at most; more get 503")
@click.option("--torch-threads", default=None, type=click.IntRange(1),
              help="torch intra-op threads (default: 1 on the CPU — more threads contend with the HTTP loop and "
                   "the other processes; unchanged on CUDA)")
@click.option("--gil-switch-ms", default=0.2, show_default=True, type=click.FloatRange(0.001),
              help="the interpreter's switch interval: how soon the scoring thread gets the GIL from a busy HTTP loop")
@click.option("--poll-s", default=1.0, show_default=True, type=click.FloatRange(0.01),
              help="how often STORE/current is checked for a new version")
@click.option("--keepalive-s", default=5.0, show_default=True, type=click.FloatRange(0),
              help="an idle connection (no byte in, no reply out) is closed after this long")
@click.option("--header-timeout-s", default=30.0, show_default=True, type=click.FloatRange(0),
              help="a request head must be complete this long after it began, and a body may not stall longer")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="serving processes on the port (each its own runtime, tier and batcher; the kernel spreads "
                   "connections over them); /metrics reports their sums")
def serve(store: Path, host: str, port: int, config: ServingConfig, max_batch_users: int, max_wait_ms: float,
          max_queue_users: int, torch_threads: int | None, gil_switch_ms: float, poll_s: float, keepalive_s: float,
          header_timeout_s: float, workers: int) -> None:
    """Serve POST /score, GET /healthz and GET /metrics for the cache store (docs/serving.md)."""
    from collectivekv.cachestore.serving.config import ServerConfig

    try:
        _ = config.torch_device  # resolved here: an unknown device fails before anything loads
    except RuntimeError as exc:  # an unknown device string: one line, not the loader's traceback
        raise click.ClickException(f"--device {config.device!r}: {exc}") from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server_config = ServerConfig(store=store, host=host, port=port, max_batch_users=max_batch_users,
                                 max_wait_ms=max_wait_ms, max_queue_users=max_queue_users, poll_s=poll_s,
                                 keepalive_s=keepalive_s, header_timeout_s=header_timeout_s, workers=workers,
                                 torch_threads=torch_threads, gil_switch_ms=gil_switch_ms, runtime=config)
    if workers > 1:
        _serve_workers(server_config)
    else:
        _serve_one(server_config)


def _announce(ready: dict) -> None:
    click.echo(json.dumps(ready), nl=True)


def _serve_workers(server_config: ServerConfig) -> None:
    from collectivekv.cachestore.serving.workers import WorkerFailed, serve_workers

    try:
        status = serve_workers(server_config, _announce)
    except WorkerFailed as exc:
        raise click.ClickException(f"{server_config.store}: {exc}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {server_config.host}:{server_config.port}: "
                                   f"{exc.strerror or exc}") from exc
    if status:
        raise SystemExit(status)


def _serve_one(server_config: ServerConfig) -> None:
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.cachestore.serving.server import bind, build_service, configure_process, url_of
    from collectivekv.cachestore.serving.server import serve as run_server
    from collectivekv.cachestore.store.publish import PublishError
    from collectivekv.cachestore.store.record import LayoutError, RecordError

    store, host, port = server_config.store, server_config.host, server_config.port
    configure_process(server_config)
    try:
        service = build_service(server_config)
    except (CheckpointError, LayoutError, RecordError, FileNotFoundError, PublishError, ValueError) as exc:
        raise click.ClickException(f"{store}: cannot serve the current version: {exc}") from exc
    try:
        sock = bind(host, port)
    except OSError as exc:
        service.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    active = service.versions.active
    _announce({"listening": url_of(sock), "store_version": active.store_version,
               "model_version": active.model_version})
    run_server(service, sock)
