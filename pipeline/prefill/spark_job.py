"""The nightly prefill as a Spark job: a thin shell around :func:`pipeline.prefill.prefill.prefill_batches`.

Driver: load the checkpoint (config, model version, layout), check the histories' schema, ship the
checkpoint to executors through Spark (``sc.addFile`` of a zip of config.json + weights.safetensors
+ its item catalogue, catalogue.parquet, when it has one: executors check the same model version),
``spark.read.parquet(histories).mapInArrow(prefill)`` -> ``sortWithinPartitions(user_id)`` -> Parquet
in ``STORE/staging/prefill-<id>/``, then build + publish the store version
(:func:`pipeline.store.store_ops.build_store`). Nothing is collected to the driver; a polling thread logs
stage progress (partitions done, users, users/s) from ``statusTracker`` and accumulators.

Executors (:mod:`pipeline.prefill.spark_executor`): each Python worker loads the model once from
``SparkFiles`` and logs each partition (users, seconds, users/s) to stderr.

Failure anywhere (a task, the write, the build) removes the staging output: nothing is published
and ``STORE/current`` is untouched.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from collectivekv.cachestore.checkpoint import load_checkpoint
from collectivekv.cachestore.store.catalogue import check_same_numbering
from collectivekv.cachestore.store.lmdb_build import StoreBuildError
from collectivekv.cachestore.store.publish import STAGING, check_store_root, new_staging_dir, new_version_id
from collectivekv.cachestore.store.record import write_layout
from collectivekv.pipeline.prefill.incremental import FP_COL, HISTORY_FP_VERSION, fingerprint_sql, previous_state
from collectivekv.pipeline.prefill.incremental import split as incremental_split
from collectivekv.pipeline.prefill.prefill import (
    ENGINES,
    OUTPUT_DDL,
    OUTPUT_SCHEMA,
    PrefillInputError,
    cache_layout,
    check_engine,
)
from collectivekv.pipeline.prefill.spark_driver import (
    _Progress,
    check_history_schema,
    get_spark,
    resolve_histories,
    ship_checkpoint,
    ship_code,
)
from collectivekv.pipeline.prefill.spark_executor import prefill_partition
from collectivekv.pipeline.prefill.spark_logging import route_spark_logs
from collectivekv.pipeline.prefill.spark_shards import build_shards
from collectivekv.pipeline.store.store_ops import (
    PREFILL_META_FILE,
    PREFILL_PARQUET_SCHEMA_VERSION,
    build_store,
    publish_sharded,
    write_json,
)

log = logging.getLogger("ckv.prefill")
DEVICES = ("auto", "cpu", "cuda")
KV_DTYPE_CHOICES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class PrefillOptions:
    """Everything `jobs/prefill.py` parses. ``mode`` None: the checkpoint's own kv_mode."""

    checkpoint: str
    histories: str
    store: str
    mode: str | None = None
    kv_dtype: str = "float16"
    device: str = "auto"
    engine: str = "auto"
    batch_users: int = 0
    memo_mb: int = 256
    sort: bool = True
    share_blocks: bool = True  # memo blocks computed once per executor, not once per Python worker
    master: str | None = None
    compression: str = "snappy"
    split_mb: int = 32
    progress_interval: float = 10.0
    spark_log_level: str | None = "WARN"
    ship_code: bool | None = None  # None: only when the master is not local
    fail_after_users: int | None = None  # test hook: a task raises after this many users
    fail_kill: bool = False  # test hook: ... or its Python worker SIGKILLs itself instead of raising
    incremental: bool = False  # reuse the previous store's rows of unchanged users (pipeline/prefill/incremental.py)
    previous: str | None = None  # the previous store (default: the output store)
    log_file: str | None = None  # Spark's log4j2 output goes here only (pipeline/prefill/spark_logging.py); None: as is
    shards: int = 1  # > 1: a sharded store, each shard built by a Spark task (pipeline/prefill/spark_shards.py)
    command_line: str = field(default_factory=lambda: command_line())


# --------------------------------------------------------------------------------- the driver
def command_line() -> str:
    """This process's command line; "spark-submit ..." when spark-submit started it (its own options
    are not visible to Python: the manifest records the master separately)."""
    cmd = shlex.join(sys.argv)
    return f"spark-submit ... {cmd}" if os.environ.get("PYSPARK_GATEWAY_PORT") else cmd


def run_prefill(opts: PrefillOptions, spark: Any = None) -> dict[str, Any]:
    """Run the prefill job; returns the published manifest. Raises on any failure (nothing published)."""
    t0 = time.perf_counter()
    job = _driver_checks(opts)
    t_load = time.perf_counter() - t0
    spark = spark or get_spark(opts.master, log_file=opts.log_file)
    t_session = time.perf_counter() - t0 - t_load
    sc = spark.sparkContext
    _configure_spark(spark, opts)
    df, carried, inc_meta = _read_histories(spark, opts, job)
    if opts.ship_code or (opts.ship_code is None and not sc.master.startswith("local")):
        ship_code(sc)
    zip_name = ship_checkpoint(sc, job.ckpt_dir, job.version)
    acc = {name: sc.accumulator(0) for name in ("users", "parts", "known", "truncated")}  # truncated: to max_len
    params = {
        "zip": zip_name, "version": job.version, "layout": job.layout.to_dict(), "device": opts.device,
        "engine": opts.engine, "batch_users": opts.batch_users, "memo_bytes": opts.memo_mb << 20,
        "fail_after": opts.fail_after_users, "fail_kill": opts.fail_kill, "share_blocks": opts.share_blocks, **acc,
    }  # fmt: skip
    out = df.mapInArrow(functools.partial(prefill_partition, params=params), f"{OUTPUT_DDL}, {FP_COL} long")
    if carried is not None:
        out = out.unionByName(carried)
    log.info("prefill: %s -> %s%s (model %s, mode %s, kv %s, engine %s, device %s, master %s)", job.histories,
             job.store, f" in {opts.shards} shards" if opts.shards > 1 else "", job.version, job.layout.mode,
             job.layout.kv_dtype, opts.engine, opts.device, sc.master)
    setup = {"checkpoint": round(t_load, 3), "spark_session": round(t_session, 3),
             "total": round(time.perf_counter() - t0, 3)}
    log.info("prefill: setup %.1f s (checkpoint %.1f s, SparkSession %.1f s)", setup["total"], t_load, t_session)
    if opts.shards > 1:
        return _run_sharded(sc, out, opts, job, acc, inc_meta, t0, setup)
    if opts.sort:
        out = out.sortWithinPartitions("user_id")
    spark_out = job.store / STAGING / f"prefill-{new_version_id()}"
    try:
        t_write = _run_stage(sc, lambda: out.write.mode("errorifexists").option("compression", opts.compression)
                             .parquet(spark_out.as_uri()), opts, job, acc["users"])
        write_layout(spark_out / "_layout.json", job.layout)
        meta = _prefill_meta(sc, opts, job, acc, time.perf_counter() - t0, t_write, setup)
        if inc_meta is not None:
            meta["incremental"] = inc_meta
        write_json(spark_out / PREFILL_META_FILE, meta)
        manifest = _build(opts, job, spark_out, meta, _on_built(inc_meta, acc))
    finally:
        shutil.rmtree(spark_out, ignore_errors=True)
    total = time.perf_counter() - t0
    manifest["prefill"]["total_seconds"] = round(total, 3)
    log.info("prefill: published %s: %d users in %.1f s total (%.0f users/s incl. LMDB build)",
             manifest["version_id"], manifest["users"], total, manifest["users"] / max(total, 1e-9))
    return manifest


@dataclass(frozen=True)
class _Job:
    """What the driver knows before Spark starts: the checkpoint, its model version and cache layout, the
    resolved histories path and the store root (its staging directory created)."""

    ckpt_dir: Path
    config: Any
    version: str
    layout: Any
    histories: str
    store: Path
    keys: dict[str, str]  # the catalogue's user / item key schemes, for the manifest (cachestore/store/user_keys.py)


def _driver_checks(opts: PrefillOptions) -> _Job:
    """Options, checkpoint (files + fingerprint), engine and item numbering checked on the driver, before any
    task; the store's staging directory created."""
    if opts.engine not in ENGINES or opts.device not in DEVICES or opts.kv_dtype not in KV_DTYPE_CHOICES:
        raise ValueError(f"bad engine/device/kv_dtype: {opts.engine}/{opts.device}/{opts.kv_dtype}")
    if "://" not in str(opts.store):
        check_store_root(opts.store)  # a directory that is not a store: refused before Spark starts
    ckpt_dir = Path(opts.checkpoint)
    ckpt = load_checkpoint(ckpt_dir)  # validates files + fingerprint on the driver
    cfg, version = ckpt.config, ckpt.model_version
    keys = {"user_key": ckpt.item_catalogue.user_key, "item_key": ckpt.item_catalogue.item_key}
    layout = cache_layout(cfg, version, opts.mode or cfg.kv_mode, opts.kv_dtype)
    check_engine(layout, opts.engine)  # e.g. memo is din-only: refused before any task
    if "://" not in opts.histories and Path(opts.histories).is_dir():
        check_same_numbering(ckpt.catalogue, opts.histories)  # a dataset dir: its item ids are the model's
    del ckpt
    histories = resolve_histories(opts.histories)
    store = Path(opts.store).resolve()
    (store / STAGING).mkdir(parents=True, exist_ok=True)
    return _Job(ckpt_dir, cfg, version, layout, histories, store, keys)


def _configure_spark(spark: Any, opts: PrefillOptions) -> None:
    """Log routing and level, Arrow batch size and input split size of the job's session."""
    sc = spark.sparkContext
    if opts.log_file:
        route_spark_logs(sc, opts.log_file)  # a JVM started before (spark-submit) logs there too
    if opts.spark_log_level:
        sc.setLogLevel(opts.spark_log_level)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "8192")
    if opts.split_mb:  # input partitions of at most this many Parquet bytes (row-group granularity)
        spark.conf.set("spark.sql.files.maxPartitionBytes", str(opts.split_mb << 20))


def _read_histories(spark: Any, opts: PrefillOptions, job: _Job) -> tuple[Any, Any, dict | None]:
    """(histories to prefill with their fingerprints, the previous store's rows carried over or None, the
    incremental meta or None)."""
    df = spark.read.parquet(job.histories)
    events = bool(job.config.event_features)  # per-event features read the timestamps too (model/events.py)
    check_history_schema(df.schema, job.histories, timestamps=events)
    # narrowed without a wrap (whatever spark.sql.ansi.enabled says): a value the narrow type cannot hold becomes
    # -1, which the per-batch checks refuse naming the user (items 1..n_items, labels 0..1)
    df = df.selectExpr("CAST(user_id AS BIGINT) AS user_id",
                       "transform(items, x -> IF(x BETWEEN 0 AND 2147483647, CAST(x AS INT), -1)) AS items",
                       "transform(labels, x -> CAST(IF(x BETWEEN 0 AND 1, x, -1) AS TINYINT)) AS labels",
                       *(["CAST(timestamps AS ARRAY<BIGINT>) AS timestamps"] if events else []))
    df = df.selectExpr("*", f"{fingerprint_sql(job.layout.max_len, timestamps=events)} AS {FP_COL}")
    carried, inc_meta = None, None
    if opts.incremental:
        prev = previous_state(opts.previous or opts.store, job.version, job.layout)
        log.info("prefill: incremental: previous %s (%s)", prev.version_id, prev.reason)
        inc_meta = {"history_fp_version": HISTORY_FP_VERSION, "previous": prev.to_dict()}
        if prev.parquet is not None:
            df, carried = incremental_split(spark, df, prev.parquet, OUTPUT_SCHEMA.names)
    return df, carried, inc_meta


def _run_stage(sc: Any, action: Any, opts: PrefillOptions, job: _Job, users: Any) -> float:
    """Run the Spark action (the Parquet write, or the shard builds) with the progress thread; its seconds."""
    progress = _Progress(sc, users, opts.progress_interval)
    progress.start()
    t_write = time.perf_counter()
    try:
        sc.setJobDescription(f"ckv prefill {job.version} -> {job.store}")
        action()
    finally:
        progress.stop.set()
        progress.join()
    return time.perf_counter() - t_write


def _prefill_meta(sc: Any, opts: PrefillOptions, job: _Job, acc: dict[str, Any], t_spark: float, t_write: float,
                  setup: dict[str, float]) -> dict[str, Any]:
    """The stage's log lines and the prefill meta written beside its output (the manifest's ``prefill``)."""
    users = acc["users"].value
    log.info("prefill: Spark stage done: %d partitions, %d users in %.1f s (%.0f users/s; %.1f s since start)",
             acc["parts"].value, users, t_write, users / max(t_write, 1e-9), t_spark)
    log.info("prefill: %d users had more than max_len=%d events: truncated to their latest %d",
             acc["truncated"].value, job.layout.max_len, job.layout.max_len)
    return {
        "prefill_parquet_schema_version": PREFILL_PARQUET_SCHEMA_VERSION,
        "checkpoint": str(job.ckpt_dir.resolve()), "histories": job.histories, "model_version": job.version,
        "model_config": asdict(job.config), **job.keys, "mode": job.layout.mode, "kv_dtype": job.layout.kv_dtype,
        "engine": opts.engine, "device": opts.device, "batch_users": opts.batch_users,
        "spark": {"master": sc.master, "app_id": sc.applicationId, "version": sc.version,
                  "default_parallelism": sc.defaultParallelism},
        "partitions": acc["parts"].value, "spark_seconds": round(t_spark, 3),
        "truncated_users": acc["truncated"].value, "setup_seconds": setup,
        "stage_seconds": round(t_write, 3), "stage_users_per_s": round(users / max(t_write, 1e-9), 1),
    }  # fmt: skip


def _on_built(inc_meta: dict | None, acc: dict[str, Any]) -> Any:
    """The build's hook: fills the incremental counts, known once the LMDB is built."""
    def on_built(manifest: dict) -> None:
        if inc_meta is None:
            return
        users = acc["users"].value
        carried_n, known = manifest["stats"]["users"] - users, acc["known"].value
        reused = inc_meta["previous"]["reusable"]
        inc_meta.update(recomputed=users, carried=carried_n, new_users=users - known, changed_users=known,
                        dropped=(inc_meta["previous"]["users"] - carried_n - known) if reused else None)
        log.info("prefill: incremental: %d users recomputed (%d changed, %d new), %d carried over, %s dropped",
                 users, known, users - known, carried_n, inc_meta["dropped"])

    return on_built


def _run_sharded(sc: Any, out: Any, opts: PrefillOptions, job: _Job, acc: dict[str, Any], inc_meta: dict | None,
                 t0: float, setup: dict[str, float]) -> dict[str, Any]:
    """The sharded path: the shards are built inside the Spark stage (pipeline/prefill/spark_shards.py), then the
    driver writes the manifest and publishes; the staging version is removed on any failure."""
    staging = new_staging_dir(job.store)
    entries: list[dict] = []
    try:
        t_write = _run_stage(sc, lambda: entries.extend(build_shards(out, staging, job.layout, opts.shards,
                                                                     opts.compression)), opts, job, acc["users"])
        t_stage_end = time.perf_counter()
        meta = _prefill_meta(sc, opts, job, acc, t_stage_end - t0, t_write, setup)
        meta["shards"] = opts.shards
        if inc_meta is not None:
            meta["incremental"] = inc_meta
        manifest = publish_sharded(job.store, staging, job.layout, entries, opts.shards, prefill=meta,
                                   command_line=opts.command_line,
                                   on_built=_refuse_empty(job, _on_built(inc_meta, acc)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    after = time.perf_counter() - t_stage_end
    manifest["prefill"]["stage_to_publish_seconds"] = round(after, 3)
    manifest["prefill"]["total_seconds"] = round(time.perf_counter() - t0, 3)
    log.info("prefill: published %s: %d users in %d shards, %.1f s total (%.2f s from the end of the stage to "
             "the publish)", manifest["version_id"], manifest["users"], opts.shards,
             manifest["prefill"]["total_seconds"], after)
    return manifest


def _refuse_empty(job: _Job, on_built: Any) -> Any:
    """The build hook that refuses to publish an empty store, then runs ``on_built``."""
    def hook(manifest: dict) -> None:
        if manifest["stats"]["users"] == 0:
            raise PrefillInputError(f"histories {job.histories} hold no users: refusing to publish an empty store")
        on_built(manifest)

    return hook


def _build(opts: PrefillOptions, job: _Job, spark_out: Path, meta: dict, on_built: Any) -> dict[str, Any]:
    """Build and publish the store version from the stage's output; never an empty store."""
    try:
        return build_store(job.store, spark_out, prefill=meta, command_line=opts.command_line,
                           on_built=_refuse_empty(job, on_built))
    except StoreBuildError as exc:  # the job's own output is valid: duplicates come from the input
        if "duplicate user id" not in str(exc):
            raise
        raise PrefillInputError(f"histories {job.histories}: {exc} (Spark output files): every user must "
                                "have exactly one row") from exc
