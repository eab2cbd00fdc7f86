"""The prefill Spark job's executor side: each Python worker loads the shipped checkpoint once (cached by
model version, device, engine, memo size and layout), on the task's GPU when ``--device auto|cuda`` finds one,
and runs :func:`pipeline.prefill.prefill.prefill_batches` over its partition (the ``mapInArrow`` body), logging
each partition (users, seconds, users/s) to stderr. The driver side is :mod:`pipeline.prefill.spark_job`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from collectivekv.cachestore.checkpoint import CheckpointError, load_checkpoint
from collectivekv.cachestore.store.entry import layout_from_dict
from collectivekv.pipeline.prefill.incremental import FP_COL, PREV_FP_COL

_ENGINE_CACHE: dict[tuple, Any] = {}


def task_gpu() -> str | None:
    """The GPU address Spark's resource scheduling assigned this task (``spark.task.resource.gpu.amount``), or
    None when the job runs without GPU scheduling."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    return gpus.addresses[0] if gpus is not None and gpus.addresses else None


def _task_device(requested: str, address: str | None) -> str:
    """The torch device a task decodes on: the CUDA device of its assigned GPU address; without one, the
    executor's default CUDA device (``auto``/``cuda``) or the CPU. An address that is not a CUDA device here (a
    discovery script that lists more GPUs than CUDA sees, a test's fake addresses) falls back to the CPU under
    ``auto`` and fails under ``cuda``."""
    import torch

    if requested == "cpu":
        return "cpu"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if address is not None:
        if address.isdigit() and int(address) < n:
            return f"cuda:{address}"
        if requested == "cuda":
            raise RuntimeError(f"--device cuda: Spark assigned GPU address {address!r}, which is not one of this "
                               f"executor's {n} CUDA devices (check the discovery script)")
        return "cpu"
    if n == 0:
        if requested == "cuda":
            raise RuntimeError("--device cuda: no CUDA device on this executor")
        return "cpu"
    return "cuda"


def _engine(params: dict) -> Any:
    from collectivekv.pipeline.prefill.prefill import make_engine

    layout = layout_from_dict(params["layout"])
    device = "cpu" if params["engine"] == "noop" else _task_device(params["device"], task_gpu())
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

    from collectivekv.pipeline.prefill.prefill import prefill_batches

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
          f"engine {engine.name}, device {device}{_gpu_note(device, params['device'])}{memo}", file=sys.stderr,
          flush=True)


def _gpu_note(device: str, requested: str) -> str:
    """", gpu address A" (+ why the task runs on the CPU) when Spark assigned the task a GPU."""
    address = task_gpu()
    if address is None:
        return ""
    fallback = device == "cpu" and requested != "cpu"
    return f", gpu address {address}" + (" (not a CUDA device here: CPU)" if fallback else "")
