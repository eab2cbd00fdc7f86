"""The Spark prefill job under faults and bad input: the driver SIGKILLed mid-stage (one spark-submit
subprocess), a Python worker SIGKILLed, the checkpoint archive missing on an executor, an empty input,
duplicate users. Each time `current` and every record stay as they were; a re-run completes and counts
the users whose history was truncated to max_len. Failures reach the terminal as one line, the trace
goes to the log (a 0-byte or non-Parquet histories file is refused before Spark starts)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collectivekv.cachestore.checkpoint import CheckpointError
from collectivekv.cachestore.store.publish import current_version_id
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.pipeline.prefill.prefill import PrefillInputError, cache_layout
from collectivekv.pipeline.prefill.spark_executor import _load_shipped_checkpoint
from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
from collectivekv.pipeline.prefill.spark_logging import one_line
from collectivekv.pipeline.store.store_ops import build_store
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.helpers import CKV, prefill_submit_command, repo_env
from tests.pipeline.prefill.prefill_helpers import histories, make_model, small_config, write_prefill

pytestmark = pytest.mark.spark
ROOT = Path(__file__).resolve().parents[2]
LENGTHS = [int(n) for n in np.random.default_rng(11).integers(0, 20, 400)]  # max_len 8: many truncated


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Histories (2 files), a checkpoint, and a store with one published version (built without Spark
    by the job's per-partition function, to save time)."""
    tmp = tmp_path_factory.mktemp("rel-spark")
    model = make_model(small_config())
    version = save_checkpoint(tmp / "ckpt", model, {})
    hist = tmp / "hist"
    hist.mkdir()
    batches = [histories(LENGTHS[:200], seed=1, first_user=0), histories(LENGTHS[200:], seed=2, first_user=200)]
    for name, b in zip(("a", "b"), batches, strict=True):
        pq.write_table(pa.Table.from_batches([b]), hist / f"{name}.parquet")
    store = tmp / "store"
    build_store(store, write_prefill(tmp, model, cache_layout(model.cfg, version), batches), command_line="first")
    return {"tmp": tmp, "ckpt": tmp / "ckpt", "hist": hist, "store": store}


def opts(ckpt: Path, hist: Path, store: Path, **kw: object) -> PrefillOptions:
    return PrefillOptions(checkpoint=str(ckpt), histories=str(hist), store=str(store), spark_log_level=None,
                          command_line="test", progress_interval=1.0, **kw)


def snapshot(store: Path) -> tuple[str | None, dict[int, bytes]]:
    with StoreReader.open_current(store) as reader:
        return current_version_id(store), {u: reader.get_raw(u) for u in reader.iter_users()}


def test_driver_killed_mid_stage(base: dict) -> None:
    """spark-submit's whole process group SIGKILLed while the Spark stage writes its output."""
    before = snapshot(base["store"])
    cmd, env = prefill_submit_command("--checkpoint", str(base["ckpt"]), "--histories", str(base["hist"]),
                                      "--out", str(base["store"]), "--engine", "direct", "--batch-users", "5")
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    staging = base["store"] / "staging"
    deadline, killed_at = time.monotonic() + 120, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any((p / "_temporary").is_dir() for p in staging.glob("prefill-*")):  # the stage is writing
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = "stage"
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    assert killed_at == "stage", "the job ended before its stage was seen running"
    assert snapshot(base["store"]) == before  # same version, every record byte-identical
    assert [p.name for p in (base["store"] / "versions").iterdir()] == [before[0]]
    # the killed run's output stays in staging/, never published; the re-run is the next test's


def test_worker_killed_then_rerun_completes(base: dict, spark: object, caplog) -> None:
    """A Python worker SIGKILLs itself mid-partition; then the re-run (after this and the driver kill)
    publishes, verifies, and logs / records how many users were truncated to max_len."""


    before = snapshot(base["store"])
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="(?i)worker|crash|exit|EOF"):
        run_prefill(opts(base["ckpt"], base["hist"], base["store"], fail_after_users=20, batch_users=10,
                         fail_kill=True), spark)
    assert snapshot(base["store"]) == before
    print(f"worker kill: job failed after {time.perf_counter() - t0:.1f} s")
    caplog.set_level(logging.INFO, logger="ckv.prefill")
    m = run_prefill(opts(base["ckpt"], base["hist"], base["store"]), spark)
    truncated = sum(n > 8 for n in LENGTHS)
    assert m["prefill"]["truncated_users"] == truncated and m["users"] == len(LENGTHS)
    assert f"{truncated} users had more than max_len=8 events" in caplog.text
    res = verify_store(base["store"], base["ckpt"], base["hist"])
    assert res.ok and res.users_checked == len(LENGTHS), res.mismatches


def test_checkpoint_missing_on_an_executor(base: dict, spark: object, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    before = snapshot(base["store"])
    import collectivekv.pipeline.prefill.spark_job as sj

    monkeypatch.setattr(sj, "ship_checkpoint", lambda sc, ckpt, version: "ckv-checkpoint-never-shipped.zip")
    with pytest.raises(Exception, match="checkpoint archive ckv-checkpoint-never-shipped.zip is missing"):
        run_prefill(opts(base["ckpt"], base["hist"], base["store"], memo_mb=1), spark)  # fresh engine key
    assert snapshot(base["store"]) == before
    # an archive that arrived without its weights file
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.write(base["ckpt"] / "config.json", "config.json")
    with pytest.raises(CheckpointError, match="cannot load the shipped checkpoint bad.zip.*not a checkpoint"):
        _load_shipped_checkpoint(str(bad), "bad.zip", str(tmp_path / "x"), "cpu")


def test_empty_input_and_duplicate_users_publish_nothing(base: dict, spark: object, tmp_path: Path) -> None:
    before = snapshot(base["store"])
    leftovers = sorted((base["store"] / "staging").iterdir())  # the killed driver's (never published)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_batches([histories([1], first_user=0)]).slice(0, 0), empty)
    with pytest.raises(PrefillInputError, match="hold no users: refusing to publish an empty store"):
        run_prefill(opts(base["ckpt"], empty, base["store"]), spark)
    dup = tmp_path / "dup"
    dup.mkdir()
    pq.write_table(pa.Table.from_batches([histories([3, 4], first_user=10)]), dup / "a.parquet")
    pq.write_table(pa.Table.from_batches([histories([2], first_user=11)]), dup / "b.parquet")
    with pytest.raises(PrefillInputError, match="duplicate user id 11.*exactly one row"):
        run_prefill(opts(base["ckpt"], dup, base["store"]), spark)
    assert snapshot(base["store"]) == before
    assert sorted((base["store"] / "staging").iterdir()) == leftovers


SPARK_LOG_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARN|ERROR) ", re.M)


@pytest.mark.parametrize("ansi", ["true", "false"])
def test_item_and_label_values_too_wide_for_the_job_are_refused_not_wrapped(base: dict, spark: object,
                                                                           tmp_path: Path, ansi: str) -> None:
    """int64 items >= 2^31 and labels outside 0..1: narrowed without a wrap whatever spark.sql.ansi.enabled says,
    then refused by the per-batch checks naming the user; nothing published."""
    from collectivekv.pipeline.prefill.spark_logging import SparkJobError, spark_job_errors

    before = snapshot(base["store"])
    wide = pa.table({"user_id": pa.array([1, 2], pa.int64()),
                     "items": pa.array([[5, 2**32 + 7], [3, 4]], pa.list_(pa.int64())),
                     "labels": pa.array([[1, 257], [0, 1]], pa.list_(pa.int64()))})
    pq.write_table(wide, tmp_path / "wide.parquet")
    spark.conf.set("spark.sql.ansi.enabled", ansi)  # type: ignore[attr-defined]
    try:
        with pytest.raises(SparkJobError, match="user 1: item -1 / label -1 outside the model's items"), \
                spark_job_errors("prefill", tmp_path / "log.txt", passthrough=(PrefillInputError,)):
            run_prefill(opts(base["ckpt"], tmp_path / "wide.parquet", base["store"]), spark)
    finally:
        spark.conf.set("spark.sql.ansi.enabled", "true")  # type: ignore[attr-defined]
    assert snapshot(base["store"]) == before


def _ckv_prefill(ckpt: Path, hist: Path, store: Path, log: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`ckv prefill` as a user runs it (its own Python and JVM); (process, seconds)."""
    env = repo_env(PYSPARK_PYTHON=sys.executable)
    cmd = [*CKV, "prefill", "--checkpoint", str(ckpt), "--histories", str(hist),
           "--out", str(store), "--master", "local[1]", "--log", str(log)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("content", [b"", b"not parquet at all"])
def test_empty_or_foreign_histories_file_is_refused_before_spark(base: dict, tmp_path: Path,
                                                               content: bytes) -> None:
    hist = tmp_path / "histories.parquet"
    hist.write_bytes(content)
    proc, seconds = _ckv_prefill(base["ckpt"], hist, tmp_path / "store", tmp_path / "prefill.log")
    assert proc.returncode == 1
    expect = "empty file (0 bytes)" if not content else "not a Parquet file"
    assert proc.stderr.startswith(f"Error: histories file {hist}: {expect}") and proc.stderr.count("\n") == 1, \
        proc.stderr[-3000:]
    assert "Spark" not in proc.stderr and not (tmp_path / "store" / "current").exists()
    print(f"refused in {seconds:.1f} s (no SparkSession)")


def test_validation_error_inside_spark_is_one_line_with_the_trace_in_the_log(base: dict, tmp_path: Path) -> None:
    """A user id the workers refuse (negative): one 'Error:' line naming the user, the worker and the log;
    no Python or Java trace and no Spark log line on the terminal; the whole trace in the log."""
    hist = tmp_path / "neg.parquet"
    pq.write_table(pa.Table.from_batches([histories([3, 4, 5], first_user=-7)]), hist)
    log = tmp_path / "logs" / "prefill.log"
    proc, seconds = _ckv_prefill(base["ckpt"], hist, tmp_path / "store", log)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err[-3000:]
    assert "failed in a Spark Python worker: PrefillInputError: user -7:" in errors[0]
    assert "re-run the job" in errors[0] and errors[0].endswith(f"full trace: {log}")
    assert "Traceback" not in err and "\tat " not in err and not SPARK_LOG_LINE.search(err), err[-3000:]
    other = [line for line in err.splitlines() if not (line.startswith(("Error:", "[ckv prefill]", "WARNING: Using "
                                                                      "incubator modules")) or " ckv." in line)]
    assert other == [], err  # only the job's own lines (progress, the error) and the JVM's start-up notice
    text = log.read_text()
    assert "Traceback" in text and "\tat org.apache" in text
    assert "pipeline.prefill.prefill.PrefillInputError: user -7" in text
    assert not (tmp_path / "store" / "current").exists()
    print(f"failed in {seconds:.1f} s; stderr {len(err.splitlines())} lines, log {len(text.splitlines())} lines")


def test_a_jvm_failure_is_summarised_by_its_deepest_cause(tmp_path: Path) -> None:
    class Py4JJavaError(Exception):  # the shape of py4j's error: a Java stack with causes
        pass

    exc = Py4JJavaError("An error occurred while calling o123.parquet.\n: org.apache.spark.SparkException: "
                        "Job aborted.\n\tat org.apache.spark.X.y(X.scala:1)\nCaused by: java.io.IOException: "
                        "No space left on device\n\tat java.io.FileOutputStream.writeBytes(Native Method)\n")
    line = one_line("prefill of /s", exc, tmp_path / "p.log")
    assert line == ("prefill of /s failed in Spark (JVM): IOException: No space left on device; nothing was "
                    "published, the current store version is unchanged; fix the cause and re-run the job; "
                    f"full trace: {tmp_path / 'p.log'}")
