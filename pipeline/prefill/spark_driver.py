"""The prefill job's Spark plumbing on the driver: the session, the histories' path and schema, shipping the
checkpoint (and, off local mode, the code) to executors, and the stage's progress log. The job itself:
:mod:`pipeline.prefill.spark_job`."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from collectivekv.cachestore.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from collectivekv.cachestore.store.catalogue import CATALOGUE_FILE
from collectivekv.pipeline.prefill.prefill import PrefillInputError, check_histories_files
from collectivekv.pipeline.prefill.spark_logging import java_options

log = logging.getLogger("ckv.prefill")


def get_spark(master: str | None = None, app_name: str = "ckv-prefill", log_file: str | None = None) -> Any:
    """The active SparkSession, or a new one (master: the given one, else spark-submit's, else
    Spark's local[*] default). Workers run this interpreter unless PYSPARK_PYTHON says otherwise.
    ``log_file``: a JVM started here logs (log4j2, WARN) to that file only, without a console progress
    bar (pipeline/prefill/spark_logging.py)."""
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


def check_history_schema(schema: Any, where: str, timestamps: bool = False) -> None:
    """Spark schema of the histories: user_id integral, items / labels (and with ``timestamps``, the model's
    per-event features' timestamps) arrays of integers."""
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in schema.fields}
    integral = (T.LongType, T.IntegerType, T.ShortType, T.ByteType)
    lists = ("items", "labels", *(("timestamps",) if timestamps else ()))
    for name in ("user_id", *lists):
        if name not in fields:
            raise PrefillInputError(f"{where}: missing column {name!r} (columns: {sorted(fields)})")
    if not isinstance(fields["user_id"], integral):
        raise PrefillInputError(f"{where}: column 'user_id' has type {fields['user_id'].simpleString()}, "
                                "expected bigint")
    for name in lists:
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
    """Zip the project's packages (collectivekv's model, pipeline, cachestore) for executors without them.

    The zip has the repository's layout (``collectivekv/__init__.py`` beside ``model/``, ``pipeline/``,
    ``cachestore/``), which ``collectivekv/__init__.py`` resolves as it does a source checkout."""
    import collectivekv
    from collectivekv import cachestore, model, pipeline

    tmp = Path(tempfile.mkdtemp(prefix="ckv-code-"))
    atexit.register(shutil.rmtree, tmp, True)
    out = tmp / "collectivekv-code.zip"
    with zipfile.ZipFile(out, "w") as zf:
        zf.write(collectivekv.__file__, "collectivekv/__init__.py")
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
