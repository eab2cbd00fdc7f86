"""The nightly prefill as a Spark job: a thin shell around :func:`pipeline.prefill.prefill_batches`.

Driver: load the checkpoint (config, model version, layout), check the histories' schema, ship the
checkpoint to executors through Spark (``sc.addFile`` of a zip of config.json + weights.safetensors
+ its item catalogue, catalogue.parquet, when it has one: executors check the same model version),
``spark.read.parquet(histories).mapInArrow(prefill)`` -> ``sortWithinPartitions(user_id)`` -> Parquet
in ``STORE/staging/prefill-<id>/``, then build + publish the store version
(:func:`pipeline.store_ops.build_store`). Nothing is collected to the driver; a polling thread logs
stage progress (partitions done, users, users/s) from ``statusTracker`` and accumulators.

Executors: each Python worker loads the model once (cached by model version, device, mode, dtype,
engine) from ``SparkFiles``, on the task's GPU when ``--device auto|cuda`` finds one, and logs each
partition (users, seconds, users/s) to stderr.

Failure anywhere (a task, the write, the build) removes the staging output: nothing is published
and ``STORE/current`` is untouched.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cachestore.entry import layout_from_dict
from cachestore.lmdb_build import StoreBuildError
from cachestore.publish import STAGING, new_version_id
from cachestore.record import write_layout
from pipeline.catalogue import CATALOGUE_FILE, check_same_numbering
from pipeline.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint
from pipeline.incremental import FP_COL, HISTORY_FP_VERSION, PREV_FP_COL, fingerprint_sql, previous_state
from pipeline.incremental import split as incremental_split
from pipeline.prefill import (
    ENGINES,
    OUTPUT_DDL,
    OUTPUT_SCHEMA,
    PrefillInputError,
    cache_layout,
    check_engine,
    check_histories_files,
)
from pipeline.spark_logging import java_options, route_spark_logs
from pipeline.store_ops import PREFILL_META_FILE, PREFILL_PARQUET_SCHEMA_VERSION, build_store, write_json

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
    incremental: bool = False  # reuse the previous store's rows of unchanged users (pipeline/incremental.py)
    previous: str | None = None  # the previous store (default: the output store)
    log_file: str | None = None  # Spark's log4j2 output goes here only (pipeline/spark_logging.py); None: as is
    command_line: str = field(default_factory=lambda: command_line())


# --------------------------------------------------------------------------------- the driver
def command_line() -> str:
    """This process's command line; "spark-submit ..." when spark-submit started it (its own options
    are not visible to Python: the manifest records the master separately)."""
    cmd = shlex.join(sys.argv)
    return f"spark-submit ... {cmd}" if os.environ.get("PYSPARK_GATEWAY_PORT") else cmd


def get_spark(master: str | None = None, app_name: str = "ckv-prefill", log_file: str | None = None) -> Any:
    """The active SparkSession, or a new one (master: the given one, else spark-submit's, else
    Spark's local[*] default). Workers run this interpreter unless PYSPARK_PYTHON says otherwise.
    ``log_file``: a JVM started here logs (log4j2, WARN) to that file only, without a console progress
    bar (pipeline/spark_logging.py)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    if log_file:
        builder = builder.config("spark.driver.extraJavaOptions", java_options(log_file))
        builder = builder.config("spark.ui.showConsoleProgress", "false")
    return builder.getOrCreate()


def resolve_histories(path: str) -> str:
    """A canonical dataset dir (meta.json + histories.parquet) means its histories.parquet; local
    paths become file:// URIs (so a cluster's default filesystem is not assumed); others pass."""
    if "://" in path:
        return path
    p = Path(path)
    if not p.exists():
        raise PrefillInputError(f"histories {path}: no such file or directory")
    if p.is_dir() and (p / "meta.json").is_file() and (p / "histories.parquet").is_file():
        p = p / "histories.parquet"
    check_histories_files(p)
    return p.resolve().as_uri()


def check_history_schema(schema: Any, where: str) -> None:
    """Spark schema of the histories: user_id integral, items / labels arrays of integers."""
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in schema.fields}
    integral = (T.LongType, T.IntegerType, T.ShortType, T.ByteType)
    for name in ("user_id", "items", "labels"):
        if name not in fields:
            raise PrefillInputError(f"{where}: missing column {name!r} (columns: {sorted(fields)})")
    if not isinstance(fields["user_id"], integral):
        raise PrefillInputError(f"{where}: column 'user_id' has type {fields['user_id'].simpleString()}, "
                                "expected bigint")
    for name in ("items", "labels"):
        t = fields[name]
        if not (isinstance(t, T.ArrayType) and isinstance(t.elementType, integral)):
            raise PrefillInputError(f"{where}: column {name!r} has type {t.simpleString()}, expected an array "
                                    "of integers")


_SHIPPED: dict[tuple[str, str], str] = {}


def ship_checkpoint(sc: Any, checkpoint: Path, version: str) -> str:
    """Add a deterministic zip of the checkpoint's config + weights (+ catalogue) to the SparkContext; its name."""
    key = (sc.applicationId, version)
    if key in _SHIPPED:
        return _SHIPPED[key]
    name = f"ckv-checkpoint-{version}.zip"
    tmp = Path(tempfile.mkdtemp(prefix="ckv-ship-"))
    atexit.register(shutil.rmtree, tmp, True)  # the driver serves the file while its context lives
    with zipfile.ZipFile(tmp / name, "w", compression=zipfile.ZIP_STORED) as zf:
        for fname in (CONFIG_FILE, WEIGHTS_FILE, CATALOGUE_FILE):
            if fname == CATALOGUE_FILE and not (checkpoint / fname).is_file():
                continue  # a checkpoint without a catalogue (identity)
            info = zipfile.ZipInfo(fname, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, (checkpoint / fname).read_bytes())
    sc.addFile(str(tmp / name))
    _SHIPPED[key] = name
    return name


def ship_code(sc: Any) -> None:
    """Zip the project's packages (model, pipeline, cachestore) for executors without them."""
    import cachestore
    import model
    import pipeline

    tmp = Path(tempfile.mkdtemp(prefix="ckv-code-"))
    atexit.register(shutil.rmtree, tmp, True)
    out = tmp / "collectivekv-code.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for pkg in (model, pipeline, cachestore):
            root = Path(pkg.__file__).parent
            for f in sorted(root.rglob("*.py")):
                zf.write(f, f"{root.name}/{f.relative_to(root)}")
    sc.addPyFile(str(out))


class _Progress(threading.Thread):
    """Logs stage progress every `interval` seconds until stopped."""

    def __init__(self, sc: Any, users: Any, interval: float) -> None:
        super().__init__(daemon=True, name="ckv-progress")
        self.sc, self.users, self.interval = sc, users, interval
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        tracker = self.sc.statusTracker()
        while not self.stop.wait(self.interval):
            try:
                stages = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
                done = sum(s.numCompletedTasks for s in stages if s)
                total = sum(s.numTasks for s in stages if s)
                users = self.users.value
                dt = time.perf_counter() - self.t0
                log.info("prefill: partitions %d/%d done (active stages %d), %d users, %.0f users/s",
                         done, total, len(stages), users, users / max(dt, 1e-9))
            except Exception as exc:  # progress must never break the job
                log.debug("progress poll failed: %s", exc)


def run_prefill(opts: PrefillOptions, spark: Any = None) -> dict[str, Any]:
    """Run the prefill job; returns the published manifest. Raises on any failure (nothing published)."""
    if opts.engine not in ENGINES or opts.device not in DEVICES or opts.kv_dtype not in KV_DTYPE_CHOICES:
        raise ValueError(f"bad engine/device/kv_dtype: {opts.engine}/{opts.device}/{opts.kv_dtype}")
    t0 = time.perf_counter()
    ckpt_dir = Path(opts.checkpoint)
    ckpt = load_checkpoint(ckpt_dir)  # validates files + fingerprint on the driver
    cfg, version = ckpt.config, ckpt.model_version
    keys = {"user_key": ckpt.item_catalogue.user_key, "item_key": ckpt.item_catalogue.item_key}  # the manifest's
    layout = cache_layout(cfg, version, opts.mode or cfg.kv_mode, opts.kv_dtype)
    check_engine(layout, opts.engine)  # e.g. memo is din-only: refused before any task
    if "://" not in opts.histories and Path(opts.histories).is_dir():
        check_same_numbering(ckpt.catalogue, opts.histories)  # a dataset dir: its item ids are the model's
    del ckpt
    histories = resolve_histories(opts.histories)
    store = Path(opts.store).resolve()
    (store / STAGING).mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter() - t0
    spark = spark or get_spark(opts.master, log_file=opts.log_file)
    t_session = time.perf_counter() - t0 - t_load
    sc = spark.sparkContext
    if opts.log_file:
        route_spark_logs(sc, opts.log_file)  # a JVM started before (spark-submit) logs there too
    if opts.spark_log_level:
        sc.setLogLevel(opts.spark_log_level)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "8192")
    if opts.split_mb:  # input partitions of at most this many Parquet bytes (row-group granularity)
        spark.conf.set("spark.sql.files.maxPartitionBytes", str(opts.split_mb << 20))
    df = spark.read.parquet(histories)
    check_history_schema(df.schema, histories)
    df = df.selectExpr("CAST(user_id AS BIGINT) AS user_id", "CAST(items AS ARRAY<INT>) AS items",
                       "CAST(labels AS ARRAY<TINYINT>) AS labels")
    df = df.selectExpr("*", f"{fingerprint_sql(layout.max_len)} AS {FP_COL}")
    carried, inc_meta = None, None
    if opts.incremental:
        prev = previous_state(opts.previous or opts.store, version, layout)
        log.info("prefill: incremental: previous %s (%s)", prev.version_id, prev.reason)
        inc_meta = {"history_fp_version": HISTORY_FP_VERSION, "previous": prev.to_dict()}
        if prev.parquet is not None:
            df, carried = incremental_split(spark, df, prev.parquet, OUTPUT_SCHEMA.names)
    if opts.ship_code or (opts.ship_code is None and not sc.master.startswith("local")):
        ship_code(sc)
    zip_name = ship_checkpoint(sc, ckpt_dir, version)
    users_acc, parts_acc, known_acc = sc.accumulator(0), sc.accumulator(0), sc.accumulator(0)
    trunc_acc = sc.accumulator(0)  # users whose history was truncated to max_len
    params = {
        "zip": zip_name, "version": version, "layout": layout.to_dict(), "device": opts.device,
        "engine": opts.engine, "batch_users": opts.batch_users, "memo_bytes": opts.memo_mb << 20,
        "fail_after": opts.fail_after_users, "users": users_acc, "parts": parts_acc,
        "fail_kill": opts.fail_kill, "truncated": trunc_acc,
        "share_blocks": opts.share_blocks, "known": known_acc,
    }  # fmt: skip
    out = df.mapInArrow(functools.partial(prefill_partition, params=params), f"{OUTPUT_DDL}, {FP_COL} long")
    if carried is not None:
        out = out.unionByName(carried)
    if opts.sort:
        out = out.sortWithinPartitions("user_id")
    spark_out = store / STAGING / f"prefill-{new_version_id()}"
    progress = _Progress(sc, users_acc, opts.progress_interval)
    log.info("prefill: %s -> %s (model %s, mode %s, kv %s, engine %s, device %s, master %s)", histories, store,
             version, layout.mode, layout.kv_dtype, opts.engine, opts.device, sc.master)
    t_setup = time.perf_counter() - t0
    log.info("prefill: setup %.1f s (checkpoint %.1f s, SparkSession %.1f s)", t_setup, t_load, t_session)
    progress.start()
    t_write = time.perf_counter()
    try:
        try:
            sc.setJobDescription(f"ckv prefill {version} -> {store}")
            out.write.mode("errorifexists").option("compression", opts.compression).parquet(spark_out.as_uri())
        finally:
            progress.stop.set()
            progress.join()
        t_spark = time.perf_counter() - t0
        t_write = time.perf_counter() - t_write
        users = users_acc.value
        log.info("prefill: Spark stage done: %d partitions, %d users in %.1f s (%.0f users/s; %.1f s since start)",
                 parts_acc.value, users, t_write, users / max(t_write, 1e-9), t_spark)
        log.info("prefill: %d users had more than max_len=%d events: truncated to their latest %d",
                 trunc_acc.value, layout.max_len, layout.max_len)
        write_layout(spark_out / "_layout.json", layout)
        meta = {
            "prefill_parquet_schema_version": PREFILL_PARQUET_SCHEMA_VERSION,
            "checkpoint": str(ckpt_dir.resolve()), "histories": histories, "model_version": version,
            "model_config": asdict(cfg), **keys, "mode": layout.mode, "kv_dtype": layout.kv_dtype,
            "engine": opts.engine, "device": opts.device, "batch_users": opts.batch_users,
            "spark": {"master": sc.master, "app_id": sc.applicationId, "version": sc.version,
                      "default_parallelism": sc.defaultParallelism},
            "partitions": parts_acc.value, "spark_seconds": round(t_spark, 3),
            "truncated_users": trunc_acc.value,
            "setup_seconds": {"checkpoint": round(t_load, 3), "spark_session": round(t_session, 3),
                              "total": round(t_setup, 3)},
            "stage_seconds": round(t_write, 3), "stage_users_per_s": round(users / max(t_write, 1e-9), 1),
        }  # fmt: skip
        if inc_meta is not None:
            meta["incremental"] = inc_meta
        write_json(spark_out / PREFILL_META_FILE, meta)

        def on_built(manifest: dict) -> None:  # incremental counts, known once the LMDB is built
            if inc_meta is None:
                return
            carried_n, known = manifest["stats"]["users"] - users, known_acc.value
            reused = inc_meta["previous"]["reusable"]
            inc_meta.update(recomputed=users, carried=carried_n, new_users=users - known, changed_users=known,
                            dropped=(inc_meta["previous"]["users"] - carried_n - known) if reused else None)
            log.info("prefill: incremental: %d users recomputed (%d changed, %d new), %d carried over, %s dropped",
                     users, known, users - known, carried_n, inc_meta["dropped"])


        def refuse_empty(manifest: dict, then: Any = on_built) -> None:  # before the publish: never an empty store
            if manifest["stats"]["users"] == 0:
                raise PrefillInputError(f"histories {histories} hold no users: refusing to publish an empty store")
            if then is not None:
                then(manifest)

        try:
            manifest = build_store(store, spark_out, prefill=meta, command_line=opts.command_line,
                                   on_built=refuse_empty)
        except StoreBuildError as exc:  # the job's own output is valid: duplicates come from the input
            if "duplicate user id" not in str(exc):
                raise
            raise PrefillInputError(f"histories {histories}: {exc} (Spark output files): every user must "
                                    "have exactly one row") from exc
    finally:
        shutil.rmtree(spark_out, ignore_errors=True)
    total = time.perf_counter() - t0
    manifest["prefill"]["total_seconds"] = round(total, 3)
    log.info("prefill: published %s: %d users in %.1f s total (%.0f users/s incl. LMDB build)",
             manifest["version_id"], manifest["users"], total, manifest["users"] / max(total, 1e-9))
    return manifest


# ------------------------------------------------------------------------------- the executors
_ENGINE_CACHE: dict[tuple, Any] = {}


def _task_device(requested: str) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise RuntimeError("--device cuda: no CUDA device on this executor")
        return "cpu"
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    return f"cuda:{gpus.addresses[0]}" if gpus is not None and gpus.addresses else "cuda"


def _engine(params: dict) -> Any:
    from pipeline.prefill import make_engine

    layout = layout_from_dict(params["layout"])
    device = "cpu" if params["engine"] == "noop" else _task_device(params["device"])
    key = (params["version"], device, params["engine"], params["memo_bytes"],
           json.dumps(params["layout"], sort_keys=True))
    if key not in _ENGINE_CACHE:
        model = None
        if params["engine"] != "noop":
            from pyspark import SparkFiles

            tmp = tempfile.mkdtemp(prefix="ckv-ckpt-")
            try:
                ckpt = _load_shipped_checkpoint(SparkFiles.get(params["zip"]), params["zip"], tmp, device)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if ckpt.model_version != params["version"]:
                raise RuntimeError(f"executor loaded model {ckpt.model_version}, driver shipped {params['version']}")
            model = ckpt.model
        _ENGINE_CACHE.clear()  # one model per worker process
        from pyspark import SparkFiles

        block_dir = Path(SparkFiles.getRootDirectory()) / "ckv-memo-blocks" if params["share_blocks"] else None
        _ENGINE_CACHE[key] = make_engine(model, layout, params["engine"], params["memo_bytes"], block_dir)
    return _ENGINE_CACHE[key], layout, device


def _load_shipped_checkpoint(archive: str, name: str, tmp: str, device: str) -> Any:
    """Extract and load the checkpoint zip shipped with sc.addFile; CheckpointError saying what to do."""
    where = f"executor {socket.gethostname()} (pid {os.getpid()})"
    if not os.path.isfile(archive):
        raise CheckpointError(
            f"{where}: the checkpoint archive {name} is missing at {archive} (the driver ships it with "
            "sc.addFile): check the executors' SPARK_LOCAL_DIRS (disk space, cleaners) and re-run the job; "
            "nothing was published")
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        return load_checkpoint(tmp, device=device)
    except (OSError, zipfile.BadZipFile, CheckpointError) as exc:
        raise CheckpointError(f"{where}: cannot load the shipped checkpoint {name} ({archive}): {exc}; re-run "
                              "the job (the archive is rebuilt from the checkpoint directory); nothing was "
                              "published") from exc


def prefill_partition(batches: Any, params: dict) -> Any:
    """mapInArrow body: prefill_batches over this partition, with counters and a log line."""
    from pyspark import TaskContext

    from pipeline.prefill import prefill_batches

    t0 = time.perf_counter()
    engine, layout, device = _engine(params)
    ctx = TaskContext.get()
    part = ctx.partitionId() if ctx is not None else -1
    n = 0
    counts: dict[str, int] = {}  # users / truncated (prefill_batches)
    fps: list[Any] = []  # history_fp of the input rows not yet output (output rows are in input order)

    def tap(it: Any) -> Any:
        for b in it:
            names = b.schema.names
            fps.append(b.column(names.index(FP_COL)).to_numpy(zero_copy_only=False))
            if PREV_FP_COL in names:
                params["known"].add(b.num_rows - b.column(names.index(PREV_FP_COL)).null_count)
            yield b

    out: pa.RecordBatch
    for out in prefill_batches(tap(batches), engine, layout, params["batch_users"], counts):
        pending = np.concatenate(fps) if len(fps) != 1 else fps[0]
        fps[:] = [pending[out.num_rows:]]
        out = out.append_column(FP_COL, pa.array(pending[:out.num_rows], pa.int64()))
        n += out.num_rows
        if params["fail_after"] is not None and n >= params["fail_after"]:
            if params.get("fail_kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure after {n} users (fail_after_users={params['fail_after']})")
        yield out
    dt = time.perf_counter() - t0
    params["users"].add(n)
    params["parts"].add(1)
    truncated = counts.get("truncated", 0)
    params["truncated"].add(truncated)
    shared = getattr(engine, "shared", None)
    memo = "" if not hasattr(engine, "size") else f", memo {engine.size} tokens" + (
        f" (blocks computed {shared.computed}, loaded {shared.loaded})" if shared is not None else "")
    print(f"[ckv prefill] partition {part}: {n} users in {dt:.1f} s ({n / max(dt, 1e-9):.0f} users/s), "
          f"{truncated} truncated to the latest {layout.max_len} events, "
          f"engine {engine.name}, device {device}{memo}", file=sys.stderr, flush=True)
