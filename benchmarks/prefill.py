"""Prefill throughput: the Spark job vs its I/O floor (CPU), and the per-partition function on a GPU.

CPU (needs pyspark, lmdb, Java; runs `spark-submit jobs/prefill.py` as a subprocess, twice):

    python benchmarks/prefill.py --users 200000 --master 'local[2]' --out benchmarks/results/prefill/prefill_cpu.json

  1. writes a synthetic user base (pipeline/data/synthetic.py: Zipf item popularity, log-uniform lengths
     1..1000) as 16 Parquet files, and an untrained checkpoint at the paper's scale (embed 64,
     d_attn 256, 8 heads, d_u 1, pool 10,000, max_len 1,000; prefill needs no trained weights);
  2. runs the job with the model (`--engine auto`) and with `--engine noop` (records of the same
     sizes from zeros: same reads, Arrow transfers, encoding, Parquet, LMDB build, publish);
  3. reports users/s of both (Spark stage, and end to end incl. the LMDB build) and the ratio.

GPU (only torch, numpy, pyarrow: no Spark, no lmdb, no safetensors):

    python benchmarks/prefill.py --gpu-only --users 50000 --out benchmarks/results/prefill/prefill_gpu.json

  times `pipeline.prefill.prefill.prefill_batches` (the mapInArrow body) on CUDA with each engine over
  in-memory synthetic batches, next to the same function with the noop engine (the executor's
  CPU-side work per user: windowing, encoding, CRCs) — the GPU must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collectivekv.model.config import CollectiveConfig, ModelConfig  # noqa: E402
from collectivekv.model.ctr import TargetAttentionCTR  # noqa: E402

PAPER = {"embed_dim": 64, "d_attn": 256, "n_heads": 8, "d_user": 1, "pool_size": 10_000, "max_len": 1000}


def model_config(n_items: int, max_len: int) -> ModelConfig:
    return ModelConfig(n_items=n_items, embed_dim=PAPER["embed_dim"], d_attn=PAPER["d_attn"],
                       n_heads=PAPER["n_heads"], max_len=max_len,
                       collective=CollectiveConfig(d_user=PAPER["d_user"], pool_size=PAPER["pool_size"]))


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["mem_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------------------- CPU
def prepare_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    from collectivekv.pipeline.data.synthetic import write_histories
    from collectivekv.pipeline.training.checkpoint import save_checkpoint

    params = {"users": args.users, "n_items": args.items, "max_len": args.max_len, "zipf_s": args.zipf,
              "files": args.files, "seed": args.seed}
    hist, ckpt, stamp = work / "histories", work / "checkpoint", work / "inputs.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("params") == params):
        t = time.perf_counter()
        paths = write_histories(hist, args.users, files=args.files, n_items=args.items, max_len=args.max_len,
                                zipf_s=args.zipf, seed=args.seed)
        import pyarrow.parquet as pq

        lengths = np.concatenate([pq.read_table(p, columns=["items"]).column("items").combine_chunks()
                                 .value_lengths().to_numpy() for p in paths])
        torch.manual_seed(args.seed)
        version = save_checkpoint(ckpt, TargetAttentionCTR(model_config(args.items, args.max_len)).eval(), {})
        data = {"users": len(lengths), "behaviours": int(lengths.sum()), "mean_length": float(lengths.mean()),
                "max_length": int(lengths.max()), "files": len(paths),
                "parquet_bytes": sum(p.stat().st_size for p in paths), "model_version": version,
                "generate_seconds": round(time.perf_counter() - t, 1)}
        stamp.write_text(json.dumps({"params": params, "data": data}, indent=2))
    return hist, ckpt, json.loads(stamp.read_text())


def run_job(work: Path, hist: Path, ckpt: Path, engine: str, args: argparse.Namespace) -> dict:
    store = work / f"store-{engine}"
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "spark-submit"), "--master", args.master, "--driver-memory", args.driver_memory,
           "--conf", "spark.ui.enabled=false", str(ROOT / "jobs" / "prefill.py"), "--checkpoint", str(ckpt),
           "--histories", str(hist), "--out", str(store), "--engine", engine, "--device", "cpu"]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    print("$", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    logs = [ln for ln in proc.stderr.splitlines() if "ckv" in ln]
    print("\n".join(logs[-12:]), flush=True)
    if proc.returncode:
        print(proc.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{engine} run failed ({proc.returncode})")
    m = json.loads((store / "manifest.json").read_text())
    p = m["prefill"]
    users = m["users"]
    # job = run_prefill from its start (SparkSession, checkpoint) to the end of the LMDB build (publish: ms)
    total = round(p["spark_seconds"] + m["stats"]["seconds"], 3)
    return {
        "command": shlex.join(cmd), "engine": engine, "users": users, "wall_seconds": round(wall, 2),
        "spark_stage_seconds": p["stage_seconds"], "job_seconds": total, "lmdb_build_seconds": m["stats"]["seconds"],
        "users_per_s_spark_stage": round(users / p["stage_seconds"], 1), "users_per_s_job": round(users / total, 1),
        "users_per_s_wall": round(users / wall, 1), "partitions": p["partitions"], "bytes": m["bytes"],
        "executor_log": [ln for ln in logs if "partition" in ln],
    }  # fmt: skip


def function_cpu(hist: Path, ckpt: Path, max_users: int) -> dict:
    """The per-partition function alone, in this process (1 thread), on the first file's users."""
    import pyarrow.parquet as pq

    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.pipeline.prefill.prefill import cache_layout, make_engine

    torch.set_num_threads(1)
    c = load_checkpoint(ckpt)
    layout = cache_layout(c.config, c.model_version)
    files = sorted(hist.glob("*.parquet"))
    table = pq.read_table(files[0], columns=["user_id", "items", "labels"]).slice(0, max_users)
    batches = table.to_batches(max_chunksize=8192)
    out = {}
    for name in ("noop", "memo", "memo-warm", "direct"):
        engine = out.get("_memo") if name == "memo-warm" else make_engine(c.model, layout, name.split("-")[0])
        sub = batches if name != "direct" else [table.slice(0, 2000).combine_chunks().to_batches()[0]]
        out[name] = _timed_prefill(engine, sub, layout, "cpu")
        if name == "memo":
            out["_memo"] = engine
            out[name]["memo_table_entries"] = engine.size
    out.pop("_memo")
    return out


def cpu_benchmark(args: argparse.Namespace) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    hist, ckpt, inputs = prepare_inputs(work, args)
    print("inputs:", json.dumps(inputs["data"]), flush=True)
    runs = {}
    for engine in args.engines.split(","):
        import shutil

        shutil.rmtree(work / f"store-{engine}", ignore_errors=True)
        runs[engine] = run_job(work, hist, ckpt, engine, args)
        print(json.dumps({k: v for k, v in runs[engine].items() if k != "executor_log"}), flush=True)
    res = {"benchmark": "prefill_cpu", "command": shlex.join([sys.executable, *sys.argv]), "machine": machine(),
           "model": {**PAPER, "n_items": args.items, "max_len": args.max_len, "weights": "untrained (random)"},
           "inputs": inputs, "runs": runs}
    if "auto" in runs and "noop" in runs:
        a, b = runs["auto"], runs["noop"]
        res["ratio_job_vs_io_floor"] = round(b["users_per_s_job"] / a["users_per_s_job"], 3)
        res["ratio_spark_stage_vs_io_floor"] = round(b["users_per_s_spark_stage"] / a["users_per_s_spark_stage"], 3)
        res["ratio_wall_vs_io_floor"] = round(a["wall_seconds"] / b["wall_seconds"], 3)
    if args.function_users:
        res["per_partition_function_cpu_1thread"] = function_cpu(hist, ckpt, args.function_users)
    return res


# ----------------------------------------------------------------------------------------- GPU
def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _rate(n: int, seconds: float) -> dict:
    return {"users": n, "seconds": round(seconds, 3), "users_per_s": round(n / seconds, 1)}


def _timed_prefill(engine: object, sub: list, layout: object, dev: str, batch_users: int = 0) -> dict:
    """Users, seconds and users / s of one ``prefill_batches`` pass of ``engine`` over the Arrow batches ``sub``."""
    from collectivekv.pipeline.prefill.prefill import prefill_batches

    n = sum(b.num_rows for b in sub)
    _sync(dev)
    t = time.perf_counter()
    for _ in prefill_batches(sub, engine, layout, batch_users):
        pass
    _sync(dev)
    return _rate(n, time.perf_counter() - t)


def _model_alone(model: TargetAttentionCTR, sub: list, max_len: int, dev: str) -> dict:
    """model.prefill on the padded windows of the users of ``sub`` in 64-user batches, no encoding."""
    from collectivekv.pipeline.data.history import arrow_window

    wins = [arrow_window(b.column(1), b.column(2), max_len) for b in sub]
    _sync(dev)
    t = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for w in wins:
            for lo in range(0, len(w.lengths), 64):
                ln = w.lengths[lo : lo + 64]
                width = max(1, int(ln.max()))
                model.prefill(torch.from_numpy(w.items[lo : lo + 64, :width]).to(dev),
                              torch.from_numpy(w.feedback[lo : lo + 64, :width]).to(dev),
                              torch.from_numpy(ln).to(dev))
                n += len(ln)
    _sync(dev)
    return _rate(n, time.perf_counter() - t)


def gpu_benchmark(args: argparse.Namespace) -> dict:
    from collectivekv.pipeline.data.synthetic import history_batches
    from collectivekv.pipeline.prefill.prefill import cache_layout, make_engine

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        print("warning: no CUDA device, timing on the CPU", file=sys.stderr)
    t = time.perf_counter()
    batches = [b.select([0, 1, 3]) for b in history_batches(args.users, n_items=args.items, max_len=args.max_len,
                                                             zipf_s=args.zipf, seed=args.seed, chunk_users=8192)]
    lengths = np.concatenate([b.column(1).value_lengths().to_numpy() for b in batches])
    gen = time.perf_counter() - t
    torch.manual_seed(args.seed)
    model = TargetAttentionCTR(model_config(args.items, args.max_len)).eval().to(dev)
    layout = cache_layout(model.cfg, "0" * 16, "collective", "float16")
    out: dict = {}
    out["noop (executor CPU work, no model)"] = _timed_prefill(make_engine(None, layout, "noop"), batches, layout, dev)
    memo = make_engine(model, layout, "memo")
    out["memo cold"] = {**_timed_prefill(memo, batches, layout, dev), "memo_table_entries": memo.size}
    out["memo warm (second pass)"] = _timed_prefill(memo, batches, layout, dev)
    direct = make_engine(model, layout, "direct")
    sub = batches[: max(1, len(batches) // 4)]
    _timed_prefill(direct, sub[:1], layout, dev)  # warm-up (CUDA kernels, allocator)
    out["direct (model.prefill per user batch)"] = _timed_prefill(direct, sub, layout, dev)
    out["model.prefill alone (64-user batches, no encoding)"] = _model_alone(model, sub, args.max_len, dev)
    return {"benchmark": "prefill_gpu_function", "command": shlex.join([sys.executable, *sys.argv]),
            "machine": machine(), "device": dev,
            "model": {**PAPER, "n_items": args.items, "max_len": args.max_len, "weights": "untrained (random)"},
            "inputs": {"users": int(len(lengths)), "behaviours": int(lengths.sum()),
                       "mean_length": float(lengths.mean()), "generate_seconds": round(gen, 1)},
            "results": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--max-len", type=int, default=1000)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="2g")
    ap.add_argument("--engines", default="noop,auto", help="job runs, in this order")
    ap.add_argument("--function-users", type=int, default=20_000,
                    help="also time the per-partition function in-process on this many users (0: skip)")
    ap.add_argument("--workdir", default="/tmp/ckv-bench-prefill")
    ap.add_argument("--gpu-only", action="store_true", help="time the per-partition function on CUDA (no Spark)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = gpu_benchmark(args) if args.gpu_only else cpu_benchmark(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
