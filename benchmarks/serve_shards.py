"""`ckv serve` across the GPUs of one host: one process per GPU, each serving one shard, vs one process on one GPU.

    python benchmarks/serve_shards.py --gpus 2 --users-per-shard 50000000       # the 2-GPU machine
    python benchmarks/serve_shards.py --device cpu --gpus 2 --users-per-shard 2000 --length 20 \\
        --rates 50,100 --duration 3 --out /tmp/serve_shards_cpu.json                  # a CPU dry run

A K-shard store of the paper's model (d_a 256, 8 heads, d_u 1, pool 10,000; fp16 caches; every user with a
full history of ``--length`` behaviours, synthetic records) is built shard by shard straight into the staging
version (:func:`cachestore.store.shard_build.build_shard`, users of shard k = the first N ids whose
``shard_of`` is k) and published with its checkpoint. Then:

- ``one``: one ``ckv serve --shards 0`` process on device 0; single requests (1 user × 64 candidates, JSON)
  for users of shard 0;
- ``all``: K processes, ``ckv serve --device cuda:k --shards k``, each with the whole shard in its resident
  tier; single requests for users of every shard, each sent to the process of its user's shard (client-side
  routing, as :class:`cachestore.serving.client.ShardRouter` does).

At each offered rate (``all``: K times the ``one`` rates, so each process gets the same load): achieved
requests/s, p50 / p99 and errors, from the open-loop generator of :mod:`benchmarks.serve_client`
(127.0.0.1 only). The goal for K = 2: ``all`` serves ≥ 1.9× the requests/s of ``one`` at equal p99.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_store import N_ITEMS, PAPER, collective_layout, synthetic_records  # noqa: E402
from benchmarks.serve_client import run_load  # noqa: E402
from benchmarks.serve_load import _env  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from collectivekv.cachestore.serving.payloads import JSON_MIME  # noqa: E402
from collectivekv.cachestore.store.publish import new_staging_dir  # noqa: E402
from collectivekv.cachestore.store.shard_build import ShardTarget, build_shard, shard_schema  # noqa: E402
from collectivekv.cachestore.store.shards import shard_of  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve_load" / "serve_shards.json"
CHUNK = 1 << 20  # users per generated record batch


def shard_users(index: int, count: int, n: int) -> np.ndarray:
    """The first ``n`` user ids (ascending) whose shard of ``count`` is ``index``."""
    found, lo = [], 0
    while sum(map(len, found)) < n:
        ids = np.arange(lo, lo + max(CHUNK, 2 * count * n // 16), dtype=np.int64)
        found.append(ids[shard_of(ids, count) == index])
        lo += len(ids)
    return np.concatenate(found)[:n]


def record_batches(users: np.ndarray, payloads: np.ndarray, crcs: np.ndarray, version: str, length: int):  # noqa: ANN201
    """Record batches (shard_schema) of ``users``, payload i % P of the P synthetic ones (all one size)."""
    size = payloads.shape[1]
    for lo in range(0, len(users), CHUNK):
        ids = users[lo : lo + CHUNK]
        pick = ids % len(payloads)
        data = pa.py_buffer(np.ascontiguousarray(payloads[pick]).reshape(-1))
        offsets = pa.py_buffer((np.arange(len(ids) + 1, dtype=np.int64) * size).astype(np.int32))
        yield pa.RecordBatch.from_arrays([
            pa.array(ids), pa.array(np.full(len(ids), length, np.int32)),
            pa.BinaryArray.from_buffers(pa.binary(), len(ids), [None, offsets, data]),
            pa.array([version] * len(ids), pa.string()), pa.array(crcs[pick]), pa.array(np.zeros(len(ids), np.int64)),
        ], schema=shard_schema())


def build_store(root: Path, work: Path, count: int, per_shard: int, length: int) -> list[np.ndarray]:
    """Publish a ``count``-shard store with its checkpoint; the users of each shard."""
    from collectivekv.model.config import CollectiveConfig, ModelConfig
    from collectivekv.model.ctr import TargetAttentionCTR
    from collectivekv.pipeline.store.store_ops import publish_sharded
    from collectivekv.pipeline.training.checkpoint import save_checkpoint

    cfg = ModelConfig(n_items=N_ITEMS, embed_dim=PAPER["embed_dim"], d_attn=PAPER["d_attn"], n_heads=PAPER["n_heads"],
                      max_len=length, collective=CollectiveConfig(d_user=PAPER["d_user"], pool_size=PAPER["pool_size"]))
    torch.manual_seed(0)
    version = save_checkpoint(work / "checkpoint", TargetAttentionCTR(cfg).eval(), {})
    layout = collective_layout(length, version, "float16")
    records = synthetic_records(layout, 4096, length, seed=7)
    payloads = np.stack([np.frombuffer(r[32:], np.uint8) for r in records])  # (4096, payload bytes)
    crcs = np.array([zlib.crc32(p.tobytes()) for p in payloads], dtype=np.int64)
    staging = new_staging_dir(root)
    users, entries = [], []
    for k in range(count):
        t0 = time.perf_counter()
        users.append(shard_users(k, count, per_shard))
        entries.append(build_shard(record_batches(users[-1], payloads, crcs, version, length), shard_schema(),
                                   ShardTarget(staging, k, count, layout, compression="none")))
        print(f"shard {k}: {per_shard:,} users in {time.perf_counter() - t0:.1f} s", flush=True)
    shutil.copytree(work / "checkpoint", staging / "checkpoint")
    publish_sharded(root, staging, layout, entries, count, prefill=None, command_line="benchmarks/serve_shards.py")
    return users


def start(root: Path, device: str, shard: int, wait_ms: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "collectivekv.jobs.cli", "serve", "--store", str(root), "--port", "0",
           "--device", device, "--shards", str(shard), "--max-wait-ms", str(wait_ms), "--poll-s", "5"]
    log = (root.parent / f"serve-{shard}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_env(), cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        log_text = (root.parent / f"serve-{shard}.log").read_text()[-3000:]
        raise SystemExit(f"ckv serve did not start: {' '.join(cmd)}\n{log_text}")
    return proc, json.loads(line)["listening"]


def measure(urls: list[str], users: list[np.ndarray], rates: list[float], duration: float, clients: int) -> list[dict]:
    g = np.random.default_rng(0)
    picks = [(k, int(g.choice(users[k]))) for k in g.integers(0, len(urls), 256)]
    bodies = [json.dumps({"user_ids": [u], "candidates": [g.integers(1, N_ITEMS + 1, 64).tolist()]}).encode()
              for _, u in picks]
    rows = []
    for rate in rates:
        res = run_load(tuple(urls), lambda i: bodies[i % len(bodies)], JSON_MIME, rate=rate, duration_s=duration,
                       max_requests=int(rate * duration) + 1, processes=clients,
                       route=lambda i: picks[i % len(picks)][0])
        row = res.summary(1)
        row.pop("versions", None)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2, help="serving processes (one per GPU) and shards")
    ap.add_argument("--device", default="cuda", help="cuda (process k on cuda:k) or cpu (a dry run)")
    ap.add_argument("--users-per-shard", type=int, default=50_000_000)
    ap.add_argument("--length", type=int, default=50, help="behaviours per user (full histories)")
    ap.add_argument("--rates", default="2000,4000,5000,6000", help="offered single requests/s per process")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4, help="load generator processes")
    ap.add_argument("--max-wait-ms", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckv-shards-"))
    root = work / "store"
    t0 = time.perf_counter()
    users = build_store(root, work, args.gpus, args.users_per_shard, args.length)
    build_s = time.perf_counter() - t0
    per_process = [float(r) for r in args.rates.split(",")]
    device = lambda k: f"cuda:{k}" if args.device == "cuda" else args.device  # noqa: E731
    results = {}
    for name, shards in (("one", [0]), ("all", list(range(args.gpus)))):
        procs = [start(root, device(k), k, args.max_wait_ms) for k in shards]
        try:
            results[name] = measure([url for _, url in procs], [users[k] for k in shards],
                                    [r * len(shards) for r in per_process], args.duration, args.clients)
        finally:
            for proc, _ in procs:
                proc.terminate()
                proc.wait()
    command = "python " + " ".join(["benchmarks/serve_shards.py", *sys.argv[1:]])
    doc = {"benchmark": "serve_shards", "command": command, "machine": machine(torch.device(args.device)),
           "gpus": args.gpus, "users_per_shard": args.users_per_shard, "length": args.length,
           "store_build_s": round(build_s, 1), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
