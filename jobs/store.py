"""`ckv store build` and `ckv store verify`.

Argument parsing only; pipeline/store/store_ops.py and pipeline/store/verify.py do the work.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import click


@click.group()
def store() -> None:
    """Cache stores: build from prefill Parquet, verify against the model."""


@store.command("build")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--store", "store_root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="store root to publish into (needed when SOURCE is a Parquet directory)")
@click.option("--progress/--no-progress", default=True)
@click.option("--shards", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="build N LMDB shards (one process; the prefill job builds them in parallel)")
def build_cmd(source: Path, store_root: Path | None, progress: bool, shards: int) -> None:
    """Build the LMDB from prefill Parquet and publish it atomically as a new store version.

    SOURCE is a store root (rebuild from its current version's Parquet) or a prefill Parquet
    directory (part files + _layout.json; then --store names the store root).
    """
    from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
    from collectivekv.cachestore.store.publish import PublishError, open_current
    from collectivekv.pipeline.store.store_ops import PARQUET_DIR, build_store, store_checkpoint

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if (source / PARQUET_LAYOUT_FILE).is_file():
        if store_root is None:
            raise click.UsageError(f"{source} is a Parquet directory: give --store STORE to publish into")
        parquet = source
    else:
        try:
            parquet = open_current(source) / PARQUET_DIR
        except FileNotFoundError as exc:
            raise click.ClickException(f"{source}: neither a prefill Parquet directory (no {PARQUET_LAYOUT_FILE}) "
                                       f"nor a published store ({exc})") from exc
        if store_root is not None and store_root.resolve() != source.resolve():
            raise click.UsageError("SOURCE is a store: --store must be omitted or the same")
        store_root = source
    checkpoint = store_checkpoint(source) if parquet != source else None  # a rebuild keeps the store's model
    try:
        if shards > 1:
            from collectivekv.pipeline.store.shard_ops import build_sharded_store

            manifest = build_sharded_store(store_root, parquet, shards, command_line=shlex.join(sys.argv),
                                           checkpoint=checkpoint)
        else:
            manifest = build_store(store_root, parquet, command_line=shlex.join(sys.argv), progress=progress,
                                   checkpoint=checkpoint)
    except (ValueError, FileNotFoundError, PublishError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"published {manifest['version_id']} to {store_root}: {manifest['users']} users, "
               f"LMDB {manifest['bytes']['lmdb_disk']} B on disk")


@store.command("verify")
@click.argument("store_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--histories", required=True, type=click.Path(exists=True),
              help="the histories the store was prefilled from (file, directory or dataset dir)")
@click.option("--sample", type=int, default=None, help="check N random users (default: every user)")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def verify_cmd(store_root: Path, checkpoint: str, histories: str, sample: int | None, seed: int, device: str,
               as_json: bool) -> None:
    """Rebuild K,V from the store (user part + pool rows) and compare with the model's own K,V.

    Exit status 1 on any mismatch (missing user, length, router index, value beyond tolerance).
    """
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.cachestore.store.publish import PublishError
    from collectivekv.pipeline.store.verify import verify_store

    try:
        res = verify_store(store_root, checkpoint, histories, sample=sample, seed=seed, device=device)
    except (CheckpointError, ValueError, FileNotFoundError, PublishError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({**vars(res), "ok": res.ok}, indent=2))
    else:
        click.echo(f"store {res.store_version} (model {res.model_version}): {res.users_in_store} users in store, "
                   f"{res.users_in_histories} in histories; checked {res.users_checked} users, "
                   f"{res.behaviours_checked} behaviours in {res.seconds:.1f} s; max abs err {res.max_abs_err:.3g}, "
                   f"max rel err {res.max_rel_err:.3g}")
        for msg in res.mismatches:
            click.echo(f"MISMATCH {msg}", err=True)
        click.echo("OK" if res.ok else f"FAILED: {res.mismatch_count} mismatches")
    if not res.ok:
        sys.exit(1)
