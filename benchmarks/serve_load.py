"""`ckv serve` under load: throughput and p50 / p99 at several offered loads, and a hot swap under load.

    python benchmarks/serve_load.py --preset cpu      # here (CPU), results in benchmarks/results/serve_load/
    python benchmarks/serve_load.py --preset gpu      # the GPU machine

A store of the paper's model (d_a 256, 8 heads, d_u 1, pool 10,000; fp16 caches, every user with a full
history of L behaviours) is published with its checkpoint, as ``ckv refresh`` publishes them, and
served by a ``ckv serve`` subprocess on 127.0.0.1; the load generator
(:mod:`benchmarks.serve_client`, open loop, bounded in count and time) runs in this process:

- ``single``: JSON requests of 1 user × 64 candidates, at each offered rate of the preset;
- ``batch``: Arrow IPC requests of 512 users × ``--batch-candidates`` candidates each;
- ``swap``: single requests at one rate for 2.5x the point duration, without and then with a new version
  published by another process from the start of the run (it starts, builds, publishes; the server loads
  it in the background and switches): errors, versions seen, and p99 with the swap vs without.

Per load point: achieved requests/s and users/s, p50 / p99 / max latency (from the scheduled send),
server-side means from /metrics (queue ms, request ms, users per device batch, runtime.score ms per batch
and the fraction of the time the worker was scoring), CPU cores used by the server and by the generator,
and the bottleneck named from those (rule in :func:`bottleneck`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_store import N_ITEMS, PAPER, collective_layout, write_fetch_parquet  # noqa: E402
from benchmarks.serve_client import LoadResult, get_json, run_load  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from collectivekv.cachestore.serving.payloads import ARROW_MIME, JSON_MIME  # noqa: E402
from collectivekv.cachestore.store.publish import build_version, new_staging_dir, publish  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve_load"
PRESETS = {  # history length, users in the store, offered loads (requests/s), seconds per point, device
    "cpu": dict(length=50, users=20_000, single=[50, 100, 200, 400, 800], batch=[2, 8, 16, 32], duration=6.0,
                device="cpu", swap_rate=100, max_batch_users=512, max_wait_ms=2.0, workers=1, clients=1),
    "gpu": dict(length=1000, users=20_000, single=[1000, 2500, 5000, 10000], batch=[100, 250, 500, 1000],
                duration=10.0, device="cuda", swap_rate=1000, max_batch_users=512, max_wait_ms=1.0,
                workers=4, clients=4),
}


def publish_paper_store(root: Path, work: Path, length: int, users: int) -> Path:
    """Publish one version (records + checkpoint) of the paper's model under root; returns the Parquet dir."""
    from collectivekv.model.config import CollectiveConfig, ModelConfig
    from collectivekv.model.ctr import TargetAttentionCTR
    from collectivekv.pipeline.training.checkpoint import save_checkpoint

    cfg = ModelConfig(n_items=N_ITEMS, embed_dim=PAPER["embed_dim"], d_attn=PAPER["d_attn"], n_heads=PAPER["n_heads"],
                      max_len=length, collective=CollectiveConfig(d_user=PAPER["d_user"], pool_size=PAPER["pool_size"]))
    torch.manual_seed(0)
    version = save_checkpoint(work / "checkpoint", TargetAttentionCTR(cfg).eval(), {})
    pdir = work / "parquet"
    write_fetch_parquet(pdir, collective_layout(length, version, "float16"), users)
    publish_version(root, pdir, work / "checkpoint")
    return pdir


def publish_version(root: Path, pdir: Path, checkpoint: Path) -> str:
    staging = new_staging_dir(root)
    build_version(pdir, staging, parquet="none")
    shutil.copytree(checkpoint, staging / "checkpoint")
    return publish(root, staging).version_id


def json_body(users: int, candidates: int, seed: int, n_users: int) -> bytes:
    g = np.random.default_rng(seed)
    return json.dumps({"user_ids": g.integers(0, n_users, users).tolist(),
                       "candidates": g.integers(1, N_ITEMS + 1, (users, candidates)).tolist()}).encode()


def arrow_body(users: int, candidates: int, seed: int, n_users: int) -> bytes:
    import pyarrow as pa

    g = np.random.default_rng(seed)
    cands = g.integers(1, N_ITEMS + 1, (users, candidates))
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, users * candidates + 1, candidates, dtype=np.int32)),
                                     pa.array(cands.reshape(-1)))
    table = pa.table({"user_id": pa.array(g.integers(0, n_users, users)), "candidates": lists})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live children (the workers of `ckv serve --workers`)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_s(int(c)) for c in children)


def _client_cpu_s() -> float:
    """CPU seconds of this process and of the generator processes it has joined."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _metric_sums(url: str) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:  # noqa: S310 (loopback)
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count")):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def bottleneck(row: dict) -> str:
    """Name what limits a load point. Below saturation (>= 97% of the offered rate achieved and p99 under
    10x p50) nothing does; else the generator when it used ~a whole core; else the scoring worker when it
    was busy (runtime.score) >= 80% of the time; else the server's event loop (HTTP parsing, payload
    validation and encoding: one Python thread, sharing the GIL with the worker)."""
    busy = f"worker busy {row['worker_busy']:.0%}, server {row['server_cores']} cores"
    if row["achieved_rps"] >= 0.97 * row["offered_rps"] and row["p99_ms"] <= 10 * max(row["p50_ms"], 1.0):
        return f"none at this load ({busy})"
    if row["client_cores"] >= 0.9 * row["client_processes"]:
        return f"load generator (client CPU; {busy})"
    if row["worker_busy"] >= 0.8:
        return f"scoring worker: runtime.score per device batch ({busy})"
    return f"server event loop: HTTP, payload parsing and encoding in one Python thread ({busy})"


def load_point(url: str, pid: int, body, ctype: str, rate: float, duration: float, users: int,  # noqa: ANN001
               clients: int = 1, workers: int = 1) -> dict:
    """One offered load; worker_busy: the fraction of the time the scoring workers (one per serving
    process) spent in runtime.score."""
    return measured_point(url, pid, body, ctype, rate, duration, users, clients, workers)[0]


def measured_point(url: str, pid: int, body, ctype: str, rate: float, duration: float, users: int,  # noqa: ANN001
                   clients: int = 1, workers: int = 1) -> tuple[dict, LoadResult]:
    """:func:`load_point`'s row and the raw result (every request's latency and scheduled time)."""
    before, cpu0, self0 = _metric_sums(url), _cpu_s(pid), _client_cpu_s()
    t0 = time.perf_counter()
    res = run_load(url, body, ctype, rate=rate, duration_s=duration, max_requests=int(rate * duration) + 1,
                   processes=clients)
    wall = time.perf_counter() - t0
    after = _metric_sums(url)

    def mean(name: str, scale: float = 1.0) -> float:
        n = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        return round(scale * (after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)) / n, 3) if n else 0.0

    row = res.summary(users)
    row.update(server_queue_ms=mean("ckv_queue_seconds", 1e3), server_request_ms=mean("ckv_request_seconds", 1e3),
               batch_users_mean=mean("ckv_batch_users"), batch_ms=mean("ckv_batch_seconds", 1e3),
               worker_busy=round((after.get("ckv_batch_seconds_sum", 0) - before.get("ckv_batch_seconds_sum", 0))
                                 / (wall * workers), 3), server_cores=round((_cpu_s(pid) - cpu0) / wall, 2),
               client_cores=round((_client_cpu_s() - self0) / wall, 2), client_processes=clients)
    row["bottleneck"] = bottleneck(row)
    print(json.dumps(row), flush=True)
    return row, res


def swap_under_load(url: str, pid: int, root: Path, pdir: Path, work: Path, p: dict, n_users: int) -> dict:
    body = lambda i: json_body(1, 64, i, n_users)  # noqa: E731
    plain = load_point(url, pid, body, JSON_MIME, p["swap_rate"], 2.5 * p["duration"], 1, p["clients"], p["workers"])
    published: dict = {}
    marks: dict[str, float] = {}

    def later() -> None:  # the publisher is another process, as a nightly `ckv refresh` is
        marks["publish_start"] = t0 = time.perf_counter()
        code = ("import sys; from pathlib import Path; from benchmarks.serve_load import publish_version; "
                "print(publish_version(*map(Path, sys.argv[1:])))")
        done = subprocess.run([sys.executable, "-c", code, str(root), str(pdir), str(work / "checkpoint")],
                              capture_output=True, text=True, env=_env(), cwd=ROOT)
        marks["published"] = time.perf_counter()
        published["version"] = done.stdout.strip() or None
        if done.returncode:
            published["error"] = done.stderr[-600:]
        published["publish_s"] = round(time.perf_counter() - t0, 2)
        swaps = get_json(url + "/healthz")["swaps"]
        while time.perf_counter() - t0 < 60 and get_json(url + "/healthz")["swaps"] == swaps:
            time.sleep(0.02)  # the switch's time, to 20 ms
        marks["switched"] = time.perf_counter()

    t = threading.Thread(target=later)
    t.start()
    swapped, raw = measured_point(url, pid, body, JSON_MIME, p["swap_rate"], 2.5 * p["duration"], 1, p["clients"],
                                  p["workers"])
    t.join()
    health = get_json(url + "/healthz")
    return {"rate": p["swap_rate"], "without_swap": plain, "with_swap": swapped, "published": published,
            "healthz_after": health, "p99_ratio": round(swapped["p99_ms"] / max(plain["p99_ms"], 1e-9), 2),
            "errors": swapped["errors"], "versions_seen": swapped["versions"], "phases": swap_phases(raw, marks)}


def swap_phases(raw: LoadResult, marks: dict[str, float]) -> dict:
    """Requests of the swap run by the phase they were scheduled in — before the publish, while the publisher
    process runs, while the server loads the new version (publish done → switch seen on /healthz, to 20 ms),
    the 2 s after the switch, the rest — with count, p50 and p99 (ms) of each: which step costs the tail."""
    at, lat = np.asarray(raw.scheduled_s), np.asarray(raw.latencies_ms)
    if not len(at) or len(marks) < 3:
        return {}
    edges = {"before_publish": (-np.inf, marks["publish_start"]),
             "publishing": (marks["publish_start"], marks["published"]),
             "loading": (marks["published"], marks["switched"]),
             "after_switch_2s": (marks["switched"], marks["switched"] + 2.0),
             "rest": (marks["switched"] + 2.0, np.inf)}
    out = {"load_s": round(marks["switched"] - marks["published"], 3)}
    for name, (lo, hi) in edges.items():
        x = lat[(at >= lo) & (at < hi)]
        out[name] = {"n": int(len(x))} | ({"p50_ms": round(float(np.percentile(x, 50)), 3),
                                            "p99_ms": round(float(np.percentile(x, 99)), 3)} if len(x) else {})
    return out


def _env() -> dict:
    """The environment of the server and publisher subprocesses: this checkout first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}


def start_server(root: Path, p: dict) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "collectivekv.jobs.cli", "serve", "--store", str(root), "--port", "0",
           "--device", p["device"],
           "--max-batch-users", str(p["max_batch_users"]), "--max-wait-ms", str(p["max_wait_ms"]), "--poll-s", "0.2",
           "--workers", str(p["workers"])]
    cmd += ["--gil-switch-ms", str(p["gil_switch_ms"])] if p.get("gil_switch_ms") else []
    env = _env()
    log = (root.parent / "serve.log").open("w")  # the server's stderr: shown if it does not start
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise SystemExit(f"ckv serve did not start: {' '.join(cmd)}\n"
                         + (root.parent / "serve.log").read_text()[-3000:])
    return proc, json.loads(line)["listening"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--batch-candidates", type=int, default=1, help="candidates per user in batch requests")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=None, help="`ckv serve --workers` (default: the preset's)")
    ap.add_argument("--clients", type=int, default=None, help="load generator processes (default: the preset's)")
    ap.add_argument("--rates", default=None, help="offered single-request loads, comma-separated (default: preset's)")
    ap.add_argument("--parts", default="single,batch,swap", help="which measurements to run (comma-separated)")
    ap.add_argument("--gil-switch-ms", type=float, default=None, help="`ckv serve --gil-switch-ms` (default: its own)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    p = dict(PRESETS[args.preset])
    p.update({k: v for k, v in (("workers", args.workers), ("clients", args.clients),
                                ("gil_switch_ms", args.gil_switch_ms)) if v is not None})
    if args.rates:
        p["single"] = [float(r) for r in args.rates.split(",")]
    out = args.out or OUT / f"serve_load_{args.preset}.json"
    with tempfile.TemporaryDirectory() as tmp:
        work, root = Path(tmp), Path(tmp) / "store"
        t0 = time.perf_counter()
        pdir = publish_paper_store(root, work, p["length"], p["users"])
        build_s = round(time.perf_counter() - t0, 1)
        proc, url = start_server(root, p)
        try:
            n = p["users"]
            run_load(url, lambda i: json_body(1, 64, i, n), JSON_MIME, rate=50, duration_s=1.0)  # warm-up
            single = [load_point(url, proc.pid, lambda i: json_body(1, 64, i, n), JSON_MIME, r, p["duration"], 1,
                                 p["clients"], p["workers"])
                      for r in p["single"] if "single" in parts]
            batch = [load_point(url, proc.pid, lambda i: arrow_body(512, args.batch_candidates, i, n), ARROW_MIME, r,
                                p["duration"], 512, 1, p["workers"]) for r in p["batch"] if "batch" in parts]
            swap = swap_under_load(url, proc.pid, root, pdir, work, p, n) if "swap" in parts else None
        finally:
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(timeout=120)
    result = {"command": " ".join(["python", *sys.argv]), "machine": machine(torch.device(p["device"])),
              "preset": {k: v for k, v in p.items()}, "batch_candidates": args.batch_candidates,
              "store_build_s": build_s, "single_1x64_json": single, f"batch_512x{args.batch_candidates}_arrow": batch,
              "swap": swap, "server_exit_code": exit_code}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if swap is not None and "error" in swap["published"]:
        raise SystemExit(f"the publish during the swap run failed:\n{swap['published']['error']}")


if __name__ == "__main__":
    main()
