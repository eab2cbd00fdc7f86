"""Nightly prefill at scale: 250,000 and 1,000,000 SYNTHETIC users through `spark-submit --master local[2]
jobs/prefill.py` on this machine, with wall time, users/s, peak memory of driver and Python workers,
store size and CR (docs/nightly.md "Scale").

    python benchmarks/scale.py --users 250000,1000000 --work /tmp/ckv-scale \
        --out benchmarks/results/scale/scale.json --png benchmarks/results/scale/scale.png
    # + day 2 through --incremental (1/16 of the users changed, 1% new) after each full run
    python benchmarks/scale.py --users 1000000 --incremental --out benchmarks/results/scale/scale_incremental.json \
        --png benchmarks/results/scale/scale_incremental.png

Inputs: pipeline/data/synthetic.py with ``lengths="fig8"`` (log-normal lengths, median 122, p90 ~253,
<1% above 470) and ``n_clusters=32`` taste clusters over Zipf(1.1) item popularity (100,000 items),
and the paper-scale untrained checkpoint of benchmarks/prefill.py (embed 64, d_attn 256, 8 heads,
d_u 1, pool 10,000, max_len 1,000; prefill needs no trained weights).

Memory: a thread samples /proc/<pid>/status (VmRSS, RssAnon, VmHWM) of every process under the
spark-submit process every 0.5 s: the driver JVM (in local mode it also runs the executors' JVM
side: Spark's heap is capped by --driver-memory), the driver's Python (jobs/prefill.py: LMDB build)
and the Python workers (pyspark.daemon and its forked workers: the model, Arrow batches, memo table).
Peaks are per group: the largest sum over the group's processes at one sample, and the largest
single-process VmHWM. RssAnon excludes file pages (LMDB / Parquet pages mapped by a process are
page cache, not private memory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prefill import machine, model_config  # noqa: E402  (benchmarks/prefill.py)

GROUPS = ("driver_jvm", "driver_python", "python_workers")


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _group(pid: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if "java" in cmd.split(" ")[0] or "SparkSubmit" in cmd:
        return "driver_jvm"
    if "pyspark.daemon" in cmd or "pyspark.worker" in cmd:
        return "python_workers"
    if "jobs/prefill.py" in cmd:
        return "driver_python"
    return None


class MemorySampler(threading.Thread):
    """Peak memory of the process tree under ``root`` by group (see the module docstring)."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop = threading.Event()
        self.peak = {g: {"rss_sum": 0, "anon_sum": 0, "hwm_max": 0, "processes_max": 0} for g in GROUPS}
        self.timeline: list[tuple[float, dict[str, int]]] = []

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.wait(self.interval):
            kids, todo, seen = _children(), [self.root], []
            while todo:
                p = todo.pop()
                seen.append(p)
                todo.extend(kids.get(p, []))
            sums = {g: [0, 0, 0] for g in GROUPS}
            for p in seen:
                g = _group(p)
                if g is None:
                    continue
                st = _status(p)
                s = sums[g]
                s[0] += st.get("VmRSS", 0)
                s[1] += st.get("RssAnon", 0)
                s[2] += 1
                self.peak[g]["hwm_max"] = max(self.peak[g]["hwm_max"], st.get("VmHWM", 0))
            for g, (rss, anon, n) in sums.items():
                pk = self.peak[g]
                pk["rss_sum"], pk["anon_sum"] = max(pk["rss_sum"], rss), max(pk["anon_sum"], anon)
                pk["processes_max"] = max(pk["processes_max"], n)
            self.timeline.append((round(time.perf_counter() - t0, 1), {g: v[0] for g, v in sums.items()}))


def prepare_inputs(work: Path, users: int, seed: int) -> tuple[Path, Path, dict]:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from collectivekv.model.ctr import TargetAttentionCTR
    from collectivekv.pipeline.data.synthetic import write_histories
    from collectivekv.pipeline.training.checkpoint import save_checkpoint

    params = {"users": users, "n_items": 100_000, "max_len": 1000, "zipf_s": 1.1, "lengths": "fig8",
              "n_clusters": 32, "seed": seed, "files": 16}
    hist, ckpt, stamp = work / f"histories-{users}", work / "checkpoint", work / f"inputs-{users}.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("params") == params):
        t = time.perf_counter()
        paths = write_histories(hist, users, files=16, n_items=100_000, max_len=1000, zipf_s=1.1, seed=seed,
                                lengths="fig8", n_clusters=32)
        lengths = np.concatenate([pq.read_table(p, columns=["items"]).column("items").combine_chunks()
                                 .value_lengths().to_numpy() for p in paths])
        if not (ckpt / "config.json").is_file():
            torch.manual_seed(seed)
            save_checkpoint(ckpt, TargetAttentionCTR(model_config(100_000, 1000)).eval(), {})
        q = np.percentile(lengths, [50, 90, 99])
        data = {"users": len(lengths), "behaviours": int(lengths.sum()), "mean_length": round(float(lengths.mean()), 1),
                "length_p50_p90_p99": [float(x) for x in q], "share_over_470": round(float((lengths > 470).mean()), 5),
                "max_length": int(lengths.max()), "parquet_bytes": sum(p.stat().st_size for p in paths),
                "generate_seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        stamp.write_text(json.dumps({"params": params, "data": data}, indent=2))
    return hist, ckpt, json.loads(stamp.read_text())


def events_checkpoint(work: Path, features: str, seed: int) -> Path:
    """The paper-scale checkpoint with ``features`` (model/events.py), written once."""
    from dataclasses import replace

    import torch

    from collectivekv.model.ctr import TargetAttentionCTR
    from collectivekv.pipeline.training.checkpoint import save_checkpoint

    ckpt = work / f"checkpoint-{features.replace(',', '-')}"
    if not (ckpt / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = replace(model_config(100_000, 1000), event_features=tuple(features.split(",")))
        save_checkpoint(ckpt, TargetAttentionCTR(cfg).eval(), {})
    return ckpt


def day2_histories(work: Path, hist: Path, users: int, seed: int) -> tuple[Path, dict]:
    """Day 2 of the synthetic base: the last of the 16 files regenerated with another seed (its users'
    histories all change: 1/16 of the users), one more file of 1% new users; the other files linked."""
    import pyarrow.parquet as pq

    from collectivekv.pipeline.data.synthetic import HISTORIES_SCHEMA, history_batches

    kw = {"n_items": 100_000, "max_len": 1000, "zipf_s": 1.1, "lengths": "fig8", "n_clusters": 32}
    day2 = work / f"histories-{users}-day2"
    if day2.exists():
        shutil.rmtree(day2)
    day2.mkdir()
    files = sorted(hist.glob("part-*.parquet"))
    for f in files[:-1]:
        os.link(f, day2 / f.name)
    first = pq.read_metadata(files[-1]).num_rows
    lo = users - first
    new = max(1, users // 100)
    for name, n, start, sd in ((files[-1].name, first, lo, seed + 1), ("part-new.parquet", new, users, seed + 2)):
        with pq.ParquetWriter(day2 / name, HISTORIES_SCHEMA) as w:
            for b in history_batches(n, first_user=start, seed=sd, chunk_users=5_000, **kw):
                w.write_batch(b, row_group_size=5_000)
    return day2, {"changed_users": first, "new_users": new}


def run(work: Path, users: int, args: argparse.Namespace, *, hist: Path | None = None,
        extra: tuple[str, ...] = ()) -> dict:
    hist0, ckpt, inputs = prepare_inputs(work, users, args.seed)
    hist = hist or hist0
    if args.event_features:  # the same untrained model with per-event features in its behaviour token
        ckpt = events_checkpoint(work, args.event_features, args.seed)
    store = work / f"store-{users}"
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "spark-submit"), "--master", args.master, "--driver-memory", args.driver_memory,
           "--conf", "spark.ui.enabled=false", str(ROOT / "jobs" / "prefill.py"), "--checkpoint", str(ckpt),
           "--histories", str(hist), "--out", str(store), "--device", "cpu", "--progress-interval", "30", *extra]
    if args.shards > 1:
        cmd += ["--shards", str(args.shards)]
    if args.engine:
        cmd += ["--engine", args.engine]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "SPARK_LOCAL_IP": "127.0.0.1"}
    print("$", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        print(err[-5000:], file=sys.stderr)
        raise SystemExit(f"{users} users: job failed ({proc.returncode})")
    print("\n".join(ln for ln in err.splitlines() if "ckv.prefill" in ln or "ckv.store" in ln), flush=True)
    m = json.loads((store / "manifest.json").read_text())
    d_attn = m["dims"]["d_attn"]
    full_fp32 = m["behaviours"] * 2 * d_attn * 4
    b = m["bytes"]
    mib = 1 << 20
    return {
        "users": m["users"], "behaviours": m["behaviours"], "inputs": inputs["data"], "command": shlex.join(cmd),
        "wall_seconds": round(wall, 1), "users_per_s_wall": round(m["users"] / wall, 1),
        "spark_stage_seconds": m["prefill"]["stage_seconds"], "lmdb_build_seconds": m["stats"]["seconds"],
        "users_per_s_stage": m["prefill"]["stage_users_per_s"], "partitions": m["prefill"]["partitions"],
        "peak_memory_mib": {g: {k: round(v / mib, 1) if k != "processes_max" else v for k, v in pk.items()}
                            for g, pk in sampler.peak.items()},
        "store_bytes": b, "store_mib": {"lmdb_disk": round(b["lmdb_disk"] / mib, 1),
                                        "parquet": round(b["parquet"] / mib, 1)},
        "cr_payload": round(b["payload"] / full_fp32, 6), "cr_lmdb_disk": round(b["lmdb_disk"] / full_fp32, 6),
        "full_kv_fp32_bytes": full_fp32, "incremental": m["prefill"].get("incremental"),
        "shards": (m.get("shards") or {}).get("count", 1), "event_features": args.event_features or None,
        "engine": _engine_of(err), "stage_to_publish_seconds": _after_stage(out),
        "memory_timeline": sampler.timeline[:: max(1, len(sampler.timeline) // 200)],
    }  # fmt: skip


def _engine_of(log: str) -> str | None:
    """The prefill engine the executors ran (their partition log lines)."""
    m = re.search(r"engine (\w+), device", log)
    return m.group(1) if m else None


def _after_stage(log: str) -> float | None:
    """Seconds from the end of the Spark stage to the publish, from the job's closing line (sharded runs)."""
    m = re.search(r"\(([\d.]+) s from the end of the stage to the publish\)", log)
    return float(m.group(1)) if m else None


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = [f"{r['users'] // 1000}k" for r in results]
    x = range(len(results))
    w = 0.25
    for i, g in enumerate(("driver_jvm", "driver_python", "python_workers")):
        xs = [j + (i - 1) * w for j in x]
        axes[0].bar(xs, [r["peak_memory_mib"][g]["rss_sum"] for r in results], w, label=f"{g} RSS", alpha=0.45,
                    color=f"C{i}")
        axes[0].bar(xs, [r["peak_memory_mib"][g]["anon_sum"] for r in results], w, label=f"{g} anon", color=f"C{i}")
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("peak MiB (light: RSS incl. file pages)")
    axes[0].set_title("peak memory by process group")
    axes[0].legend(fontsize=8)
    axes[1].bar(labels, [r["wall_seconds"] for r in results], color="gray")
    for j, r in enumerate(results):
        axes[1].text(j, r["wall_seconds"], f"{r['users_per_s_wall']:.0f} users/s", ha="center", va="bottom")
    axes[1].set_ylabel("wall seconds (spark-submit)")
    axes[1].set_title("wall time")
    for r in results:
        tl = r["memory_timeline"]
        axes[2].plot([t for t, _ in tl], [sum(v.values()) / 2**30 for _, v in tl], label=f"{r['users'] // 1000}k")
    axes[2].set_xlabel("seconds")
    axes[2].set_ylabel("total RSS (GiB)")
    axes[2].set_title("memory over time (all groups)")
    axes[2].legend()
    fig.suptitle("ckv prefill, synthetic users (fig8 lengths, 32 taste clusters), local[2], 2 CPU cores")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="250000,1000000", help="comma-separated user counts")
    ap.add_argument("--work", default="/tmp/ckv-scale")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="2g")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-stores", action="store_true", help="keep each run's store (default: removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale/scale.json"))
    ap.add_argument("--png", default=str(ROOT / "benchmarks" / "results" / "scale/scale.png"))
    ap.add_argument("--incremental", action="store_true",
                    help="after each full run, an --incremental run of day 2 (1/16 of the users changed, 1%% new)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    ap.add_argument("--engine", default=None, help="the prefill engine (default: the job's auto)")
    ap.add_argument("--event-features", default="", help="e.g. gap,hour: the model with per-event features")
    ap.add_argument("--shards", type=int, default=1,
                    help="N > 1: a sharded store (jobs/prefill.py --shards N; shards built inside the Spark stage)")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text())["runs"], Path(args.png))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(u) for u in args.users.split(",") if u]:
        r = run(work, n, args)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "memory_timeline"}, indent=2), flush=True)
        if args.incremental:  # day 2: --incremental against the day-1 store just published
            day2, changes = day2_histories(work, work / f"histories-{n}", n, args.seed)
            inc = run(work, n, args, hist=day2, extra=("--incremental",))
            inc["day2_changes"] = changes
            r["incremental_day2"] = inc
            print(json.dumps({k: v for k, v in inc.items() if k != "memory_timeline"}, indent=2), flush=True)
        if not args.keep_stores:
            shutil.rmtree(work / f"store-{n}", ignore_errors=True)
        report = {"machine": machine(), "command": shlex.join([sys.executable, *sys.argv]), "runs": results}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        plot(results, Path(args.png))


if __name__ == "__main__":
    main()
