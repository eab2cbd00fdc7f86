"""A real Spark standalone cluster on 127.0.0.1: master + one worker (2 cores, two fake GPUs from
jobs/gpu_discovery.sh), `spark-submit --master spark://127.0.0.1:PORT jobs/prefill.py`, the result compared with
local mode's byte for byte; then the sharded job with GPU scheduling: each task gets its own GPU address, which is
no CUDA device here, so it decodes on the CPU, and the executors' shards hold the same records.

Only 127.0.0.1 is ever used: SPARK_LOCAL_IP / --host / spark.driver.host / bindAddress all say so,
and the ports are free ports of 127.0.0.1. Both daemons are killed (their process groups) in a finally.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.sharded_reader import open_reader
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.zoo import create_model
from collectivekv.pipeline.data.synthetic import history_batches
from collectivekv.pipeline.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.spark
ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log} after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def raw_values(store: Path) -> dict[int, bytes]:
    with StoreReader.open_current(store) as reader:
        return {uid: reader.get_raw(uid) for uid in reader.iter_users()}


def write_inputs(tmp_path: Path) -> None:
    """A small collective checkpoint (tmp_path/ckpt) and 500 users' histories in two Parquet files (tmp_path/hist)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=300, embed_dim=8, d_attn=16, n_heads=2, max_len=20, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=32))
    save_checkpoint(tmp_path / "ckpt", create_model(cfg).eval(), {})
    hist = tmp_path / "hist"
    hist.mkdir()
    table = pa.Table.from_batches(list(history_batches(500, n_items=300, max_len=60, seed=3, chunk_users=250)))
    pq.write_table(table.slice(0, 250), hist / "part-0.parquet")
    pq.write_table(table.slice(250), hist / "part-1.parquet")


def spark_env() -> dict[str, str]:
    """The environment of the daemons and of spark-submit: 127.0.0.1 only, this Python, daemons in the foreground."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "SPARK_LOCAL_IP": HOST, "SPARK_MASTER_HOST": HOST, "SPARK_HOME": str(spark_home()),
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "SPARK_NO_DAEMONIZE": "1"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    return env


def submit_prefill(env: dict[str, str], tmp_path: Path, master: str, out: Path, *extra: str,
                   extra_job: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`spark-submit jobs/prefill.py` of tmp_path's checkpoint and histories to ``master``, into ``out``: it succeeds,
    on 127.0.0.1 only."""
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", master, "--driver-memory", "512m", *extra,
           "--conf", f"spark.driver.host={HOST}", "--conf", f"spark.driver.bindAddress={HOST}",
           "--conf", "spark.ui.enabled=false", "--conf", f"spark.pyspark.python={sys.executable}",
           str(ROOT / "jobs" / "prefill.py"), "--checkpoint", str(tmp_path / "ckpt"),
           "--histories", str(tmp_path / "hist"), "--out", str(out), "--progress-interval", "2", *extra_job]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "192." not in proc.stderr and "using 127.0.0.1" not in proc.stderr
    return proc


def start_daemon(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A Spark daemon (`spark-class` with ``args``) in its own process group, its output in ``log``."""
    with open(log, "w") as fh:
        return subprocess.Popen([str(spark_home() / "bin" / "spark-class"), *args], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run_on_cluster(tmp_path: Path, env: dict[str, str]) -> None:
    """Master + worker on 127.0.0.1: the prefill job into tmp_path/cluster, then the sharded job with GPU scheduling
    into tmp_path/sharded; both daemons stopped after, and the worker's log shows it launched the executors."""
    discovery = str(ROOT / "jobs" / "gpu_discovery.sh")
    # the worker offers two fake GPUs (addresses that are no CUDA device here): tasks get one each, fall back to the CPU
    worker_env = {**env, "CKV_GPU_ADDRESSES": "0,1", "SPARK_WORKER_OPTS": "-Dspark.worker.resource.gpu.amount=2 "
                  f"-Dspark.worker.resource.gpu.discoveryScript={discovery}"}
    mport, mui, wport, wui = free_port(), free_port(), free_port(), free_port()
    master_url = f"spark://{HOST}:{mport}"
    mlog, wlog = tmp_path / "master.log", tmp_path / "worker.log"
    master = worker = None
    try:
        master = start_daemon(["org.apache.spark.deploy.master.Master", "--host", HOST, "--port", str(mport),
                               "--webui-port", str(mui)], env, mlog)
        wait_for(mlog, "I have been elected leader", master, 45)
        worker = start_daemon(["org.apache.spark.deploy.worker.Worker", master_url, "--host", HOST, "--port",
                               str(wport), "--webui-port", str(wui), "--cores", "2", "--memory", "2g", "--work-dir",
                               str(tmp_path / "work")], worker_env, wlog)
        wait_for(wlog, "Successfully registered with master", worker, 45)
        proc = submit_prefill(env, tmp_path, master_url, tmp_path / "cluster", "--executor-memory", "512m",
                              "--total-executor-cores", "1")
        assert f"master {master_url}" in proc.stderr  # the job ran on the standalone master
        assert "app-" in (tmp_path / "cluster" / "manifest.json").read_text()  # a standalone app id
        gpus = ("--conf", "spark.executor.resource.gpu.amount=2", "--conf", "spark.task.resource.gpu.amount=1",
                "--conf", f"spark.executor.resource.gpu.discoveryScript={discovery}", "--executor-cores", "2")
        submit_prefill(env, tmp_path, master_url, tmp_path / "sharded", "--executor-memory", "1g",
                       "--total-executor-cores", "2", *gpus, extra_job=("--shards", "2"))
    finally:
        stop(worker)
        stop(master)
    wtext = wlog.read_text(errors="replace")
    assert "Asked to launch executor" in wtext and "--hostname\" \"127.0.0.1\"" in wtext  # the worker ran it


def test_standalone_cluster_equals_local(tmp_path: Path) -> None:
    write_inputs(tmp_path)
    env = spark_env()
    run_on_cluster(tmp_path, env)
    submit_prefill(env, tmp_path, "local[1]", tmp_path / "local")  # local mode, same inputs (also on 127.0.0.1 only)
    a, b = raw_values(tmp_path / "cluster"), raw_values(tmp_path / "local")
    assert len(a) == 500 and a == b
    with open_reader(tmp_path / "sharded") as sharded:  # shards built by the executor's tasks: the same records
        assert {u: sharded.get_raw(u) for u in sharded.iter_users()} == a
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").glob("app-*/*/stderr"))
    seen = set(re.findall(r"gpu address (\S+) \(not a CUDA device here: CPU\)", logs))
    assert seen == {"0", "1"}, logs[-3000:]  # distinct addresses per concurrent task, each falling back
