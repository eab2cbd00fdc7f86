"""`ckv refresh`: the nightly refresh cycle as one job (pipeline/store/refresh.py, docs/nightly.md).

prepare -> train --init-from the current model -> evaluate (gate) -> prefill -> verify -> publish
checkpoint and store together. Exit 0: published; 3: the new model was refused by the gate; 1: any
other failure. Nothing is published unless every step passed.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from collectivekv.jobs.prepare import prepare_cmd, prepare_config
from collectivekv.jobs.train import COUNT, RATE, training_device

EXIT_REFUSED = 3
# the event-log options of `ckv data prepare` (same names and defaults), except --out / --events / --overwrite
# and the impression-log inputs (prepare those with `ckv data prepare --impressions`, then --dataset)
_PREPARE_PARAMS = [p for p in prepare_cmd.params
                   if p.name not in ("out", "events", "overwrite", "impressions", "history")]


def _prepare_config(events: Path, kw: dict[str, Any]) -> Any:
    return prepare_config(events, Path("unset"), **{p.name: kw.pop(p.name) for p in _PREPARE_PARAMS})


@click.command("refresh", params=list(_PREPARE_PARAMS))
@click.option("--store", required=True, type=click.Path(file_okay=False), help="store root STORE (published into)")
@click.option("--work", required=True, type=click.Path(file_okay=False),
              help="work dir: WORK/<run id>/{data,checkpoint,refresh.json}")
@click.option("--events", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the new day's event log (ckv data prepare --events)")
@click.option("--dataset", type=click.Path(exists=True, file_okay=False),
              help="an already prepared dataset instead of --events")
@click.option("--current-checkpoint", type=click.Path(exists=True, file_okay=False),
              help="current model [default: STORE/current/checkpoint; needed for a store's first refresh]")
@click.option("--epochs", type=COUNT, default=1, show_default=True)
@click.option("--batch-size", type=COUNT, default=1024, show_default=True)
@click.option("--lr", type=RATE, default=1e-3, show_default=True)
@click.option("--patience", type=COUNT, default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--metric", type=click.Choice(["gauc", "auc"]), default="gauc", show_default=True,
              help="validation metric of the gate")
@click.option("--margin", default=0.005, show_default=True,
              help="refuse the new model if its metric < current's - margin (absolute)")
@click.option("--master", default=None, help="Spark master of the prefill [default: local[*]]")
@click.option("--engine", default="auto", show_default=True, help="prefill engine")
@click.option("--shards", type=click.IntRange(1, 4096), default=None,
              help="LMDB shards of the published store (ckv prefill --shards) [default: the current version's; a "
                   "new count needs the servers restarted with their new --shards]")
@click.option("--verify-sample", type=int, default=None, help="users verified [default: all]")
def refresh_cmd(store: str, work: str, events: Path | None, dataset: str | None, current_checkpoint: str | None,
                epochs: int, batch_size: int, lr: float, patience: int, device: str, seed: int, metric: str,
                margin: float, master: str | None, engine: str, shards: int | None, verify_sample: int | None,
                **kw: Any) -> None:
    """Nightly refresh: prepare, warm-start train, gate, prefill, verify, publish model + store together."""
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.cachestore.store.publish import PublishError, check_store_root
    from collectivekv.pipeline.store.refresh import RefreshError, RefreshOptions, RefreshRefused, run_refresh
    from collectivekv.pipeline.store.safe_output import OutputError, check_not_input, check_not_inside
    from collectivekv.pipeline.training.trainer import TrainConfig

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if (events is None) == (dataset is None):
        raise click.UsageError("give exactly one of --events and --dataset")
    try:  # the run writes WORK/<run id>/ and STORE/staging/: neither may hold the inputs
        check_not_input(Path(work), (events, dataset), "--work")
        check_not_input(Path(store), (events, dataset), "--store")
        check_store_root(store)  # a directory that is not a store: refused before anything runs
        check_not_inside(Path(work), (store,), "--work")  # a work folder inside the store makes it no store root
        shards = shards or current_shard_count(Path(store))
    except (OutputError, PublishError) as exc:
        raise click.ClickException(str(exc)) from exc
    prep = _prepare_config(events, kw) if events is not None else None
    opts = RefreshOptions(
        store=store, work=work, prepare=prep, dataset=dataset, current_checkpoint=current_checkpoint,
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed,
                          device=training_device(device), progress=False),
        metric=metric, margin=margin, prefill={"master": master, "engine": engine, "shards": shards},
        verify_sample=verify_sample,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, _terminated)  # the run's cleanup (its scratch store under STORE/staging/) runs
    try:
        report = run_refresh(opts)
    except RefreshRefused as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except (RefreshError, CheckpointError, ValueError, OSError, PublishError) as exc:  # inputs, disks: one line
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"published": report["published"], "gate": {k: report["gate"][k] for k in
                                                                      ("metric", "delta", "margin", "passed")},
                           "seconds": report["seconds"]}, indent=2))


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM → SystemExit(143) in the main thread, so the run's ``finally`` blocks remove what it wrote."""
    raise SystemExit(128 + signum)


def current_shard_count(store: Path) -> int:
    """The shard count of the store's published version (1 when unsharded or nothing is published yet)."""
    from collectivekv.cachestore.store.publish import open_current
    from collectivekv.cachestore.store.shard_version import version_shards

    try:
        shards = version_shards(open_current(store))
    except FileNotFoundError:
        return 1
    return 1 if shards is None else shards.count


if __name__ == "__main__":
    refresh_cmd(prog_name="jobs/refresh.py")
