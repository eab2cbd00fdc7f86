"""The nightly prefill job: `spark-submit [--master ...] jobs/prefill.py --checkpoint CKPT --histories PATH
--out STORE`, or `ckv prefill ...` (same options; Spark in local mode unless --master is given).

Argument parsing only; pipeline/prefill/spark_job.py runs the job (docs/prefill.md).
"""

from __future__ import annotations

import logging
import sys

import click

from collectivekv.pipeline.prefill.prefill import ENGINES


@click.command("prefill")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="checkpoint directory (ckv train)")
@click.option("--histories", required=True,
              help="histories Parquet: a file, a directory of many files, a dataset dir, or a URI")
@click.option("--out", "store", required=True, type=click.Path(file_okay=False), help="store root STORE")
@click.option("--mode", type=click.Choice(["collective", "full"]), default=None,
              help="cache to write [default: the checkpoint's kv_mode]; full = the full-KV baseline")
@click.option("--kv-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="executors' device: auto = a GPU when the executor has one")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="auto", show_default=True,
              help="auto/memo/direct (same values; see docs/prefill.md); noop = I/O floor, zeros; zoo archs: "
                   "auto/direct = the zoo engine, memo refused")
@click.option("--batch-users", default=0, show_default=True, help="users per model batch (0: auto)")
@click.option("--memo-mb", default=256, show_default=True, help="per-worker token table cap (memo engine)")
@click.option("--share-blocks/--no-share-blocks", default=True, show_default=True,
              help="memo blocks computed once per executor (shared dir), not once per Python worker")
@click.option("--sort/--no-sort", default=True, show_default=True, help="sort each output file by user id")
@click.option("--master", default=None, help="Spark master [default: spark-submit's, else local[*]]")
@click.option("--split-mb", default=32, show_default=True,
              help="max Parquet MB per input partition (0: Spark's default)")
@click.option("--compression", default="snappy", show_default=True, help="Parquet codec")
@click.option("--progress-interval", default=10.0, show_default=True, help="seconds between progress logs")
@click.option("--spark-log-level", default="WARN", show_default=True, help="Spark's log level ('' keeps it)")
@click.option("--ship-code/--no-ship-code", default=None,
              help="send the project's packages to executors [default: only for a non-local master]")
@click.option("--incremental/--no-incremental", default=False, show_default=True,
              help="recompute only users whose history changed since --previous (same model version); "
                   "carry the other rows over (docs/nightly.md)")
@click.option("--previous", default=None, type=click.Path(file_okay=False),
              help="previous store for --incremental [default: --out]")
@click.option("--shards", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="split users into N LMDB shards by pmod(murmur3(user_id), N), each built by a Spark task "
                   "(STORE must be a filesystem every executor mounts; docs/sharding.md)")
@click.option("--log", "log_file", default=None, type=click.Path(dir_okay=False),
              help="log file: Spark's log (WARN) and, on failure, the full trace "
                   "[default: STORE/logs/prefill-<UTC time>-<pid>.log]")
@click.option("--verbose", is_flag=True, help="Spark's log and failure traces on the terminal too")
@click.option("--fail-after-users", type=int, default=None, hidden=True, help="test hook: tasks fail")
def prefill_cmd(checkpoint: str, histories: str, store: str, log_file: str | None, verbose: bool,
                **kw: object) -> None:
    """Prefill every user's compact KV cache with Spark; build and publish STORE (Parquet + LMDB).

    A failure ends in one line (what failed, where, what to do) with the full trace in the log file.
    """
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.cachestore.store.publish import PublishError
    from collectivekv.pipeline.prefill.prefill import PrefillInputError
    from collectivekv.pipeline.prefill.spark_job import PrefillOptions, command_line, run_prefill
    from collectivekv.pipeline.prefill.spark_logging import SparkJobError, default_log_path, spark_job_errors

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    log_path = default_log_path(store) if log_file is None else log_file
    own = (CheckpointError, PrefillInputError, PublishError, ValueError)  # raised by the driver: already one line
    try:
        with spark_job_errors(f"prefill of {store}", log_path, verbose=verbose, passthrough=own):
            opts = PrefillOptions(checkpoint=checkpoint, histories=histories, store=store,
                                  command_line=command_line(), log_file=None if verbose else str(log_path),
                                  **kw)  # type: ignore[arg-type]
            manifest = run_prefill(opts)
    except (*own, SparkJobError) as exc:
        raise click.ClickException(str(exc)) from exc
    b = manifest["bytes"]
    shards = ""
    if manifest.get("shards"):
        shards = (f" in {manifest['shards']['count']} shards ({manifest['prefill']['stage_to_publish_seconds']:.2f} s "
                  "from the end of the stage to the publish)")
    click.echo(f"published {manifest['version_id']} to {store}: {manifest['users']} users{shards}, "
               f"{manifest['mode']} {manifest['dtypes']['kv']}, payload {b['payload']} B, "
               f"LMDB {b['lmdb_disk']} B on disk, Parquet {b['parquet']} B")


if __name__ == "__main__":  # spark-submit jobs/prefill.py ...
    prefill_cmd(prog_name="jobs/prefill.py")
