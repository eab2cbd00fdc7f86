"""Concurrent serving while new store versions are published.

N reader processes score continuously with ``DecodeRuntime`` on a small collective store while the
parent publishes P new versions of it (``pipeline.store.store_ops.build_store``: staging -> versions/<id> ->
one rename of ``STORE/current``). Every record of version k carries a pattern that identifies k
(user K/V parts all equal to k + 1, router indices all equal to k), so a read that mixes versions —
within a record, within a batch, or going back to an older version — is detected. Each reader:

- follows ``STORE/current``: when the link changed it opens a new runtime on the new version (resolved
  once; the previous runtime keeps its own, consistent version until then);
- per batch (``--batch`` random users, 4 candidates each): ``reader.get_many`` (CRC + model version
  checked) then ``DecodeRuntime.score``; the batch must be all one version, equal to the version its
  runtime was opened on, never older than a version seen before, every user present (records lost),
  every logit finite. The score latency (fetch + transfer + decode) of every batch is recorded.

Writes ``benchmarks/results/concurrent_serving/concurrent_serving.json`` (``--out``): reads, errors,
mixed-version reads, lost records, p50 / p99 / max latency, publishes and their durations, the machine.

    python benchmarks/concurrent_serving.py                       # 8 readers x 3 publishes (defaults)
    python benchmarks/concurrent_serving.py --readers 3 --publishes 2 --users 300 --out /tmp/x.json

The test (tests/integration/test_reliability_concurrency.py) runs a short version of it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "concurrent_serving"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_CAND = 4


def model_and_layout():
    """A small collective model (fixed seed) and the layout of its store."""
    import torch

    from collectivekv.model.config import CollectiveConfig, ModelConfig
    from collectivekv.model.ctr import TargetAttentionCTR
    from collectivekv.pipeline.prefill.prefill import cache_layout

    cfg = ModelConfig(n_items=200, n_genres=5, max_genres=2, embed_dim=16, d_attn=32, n_heads=4, max_len=50,
                      mlp_dims=(16,), collective=CollectiveConfig(d_user=1, pool_size=64))
    torch.manual_seed(0)
    model = TargetAttentionCTR(cfg).eval()
    return model, cache_layout(cfg, "00c0ffee00c0ffee")


def write_version_parquet(out: Path, layout, users: int, k: int, seed: int) -> Path:
    """Prefill Parquet of version k: every user 1..max_len behaviours, parts = k + 1, indices = k."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, prefill_schema
    from collectivekv.cachestore.store.record import write_layout

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    rows = []
    for uid in range(users):
        n = int(rng.integers(1, layout.max_len + 1))
        payload = b"".join(np.full((n, p.width), k + 1 if p.kind == "kv" else k, layout.dtype(p.kind)).tobytes()
                           for p in layout.parts)  # the din parts: k_user, v_user, k_idx, v_idx
        rows.append({"user_id": uid, "length": n, "payload": payload, "model_version": layout.model_version,
                     "checksum": zlib.crc32(payload)})
    pq.write_table(pa.Table.from_pylist(rows, schema=prefill_schema()), out / "part-00000.parquet")
    write_layout(out / PARQUET_LAYOUT_FILE, layout)
    return out


def record_version(rec) -> int | None:
    """The version k a record's pattern says, or None if the record is not uniformly one version."""
    a = rec.arrays
    k = float(a["kv.k_user"].reshape(-1)[0]) - 1
    ok = (a["kv.k_user"] == k + 1).all() and (a["kv.v_user"] == k + 1).all()
    for name in ("kv.k_idx", "kv.v_idx"):
        ok = ok and (name not in a or (a[name] == k).all())
    return int(k) if ok and k == int(k) else None


class _Current:
    """A serving process's view of the store: the version ``current`` points at (reader, runtime, link target,
    version tag), reopened when the link moves; counts reopens, retries and mixed versions in ``out``."""

    def __init__(self, store: str, batch: int, out: dict) -> None:
        from collectivekv.cachestore.store.publish import CURRENT

        self.store, self.batch, self.out = store, batch, out
        self.link = Path(store) / CURRENT
        self.model, self.layout = model_and_layout()
        self.rt, self.reader, self.target, self.version = None, None, None, -1

    def stale(self) -> bool:
        return self.rt is None or os.readlink(self.link) != self.target

    def reopen(self) -> None:
        from collectivekv.cachestore.decode.runtime import DecodeRuntime
        from collectivekv.cachestore.store.publish import open_current
        from collectivekv.cachestore.store.reader import StoreReader

        for _ in range(20):  # a version pruned between resolving `current` and opening it: resolve again
            try:
                tgt = os.readlink(self.link)
                new = StoreReader(open_current(self.store))
                len(new)  # opens the LMDB environment now
                first = new.get(0)
                break
            except (FileNotFoundError, OSError) as exc:
                self.out["open_retries"] += 1
                last = exc
                time.sleep(0.01)
        else:
            raise RuntimeError(f"could not open the current version: {last}")
        k = record_version(first)
        if k is None or k < self.version:
            self.out["mixed"] += 1
        if self.reader is not None:
            self.reader.close()
        self.rt = DecodeRuntime(self.model, self.layout.model_version, new, device="cpu", batch_users=self.batch)
        self.reader, self.target, self.version = new, tgt, k
        self.out["reopens"] += 1
        self.out["versions_seen"].append(k)


def _serve_batch(cur: _Current, rng: np.random.Generator, users: int) -> None:
    """One batch: fetch the records, score, and count latency, cold users and mixed versions in ``cur.out``."""
    out, batch = cur.out, cur.batch
    ids = rng.integers(0, users, batch)
    cand = rng.integers(1, cur.model.cfg.n_items + 1, (batch, N_CAND))
    recs = cur.reader.get_many(ids.tolist())
    t0 = time.perf_counter()
    res = cur.rt.score(ids, cand)
    out["latency_ms"].append((time.perf_counter() - t0) * 1e3)
    out["batches"] += 1
    out["records"] += batch
    out["lost"] += sum(r is None for r in recs) + int(res.cold_start.sum())
    tags = {record_version(r) for r in recs if r is not None}
    if len(tags) > 1 or None in tags or (tags and tags != {cur.version}):
        out["mixed"] += 1
    if not np.isfinite(res.logits).all():
        raise AssertionError("non-finite logits")


def reader_main(store: str, users: int, batch: int, seed: int, stop, ready, queue) -> None:
    """One serving process (created after fork); puts its figures on `queue` when `stop` is set."""
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    out = {"pid": os.getpid(), "batches": 0, "records": 0, "errors": 0, "error_samples": [], "mixed": 0,
           "lost": 0, "reopens": 0, "open_retries": 0, "versions_seen": [], "latency_ms": []}
    cur = _Current(store, batch, out)
    ready.wait()
    while not stop.is_set():
        try:
            if cur.stale():
                cur.reopen()
            _serve_batch(cur, rng, users)
        except Exception as exc:  # counted and reported, the reader goes on
            out["errors"] += 1
            if len(out["error_samples"]) < 5:
                out["error_samples"].append("".join(traceback.format_exception_only(exc)).strip())
            cur.rt = None
    queue.put(out)


def run(store: Path, *, readers: int = 8, publishes: int = 3, users: int = 2000, batch: int = 64,
        warmup_s: float = 2.0, interval_s: float = 2.0, tail_s: float = 2.0, work: Path | None = None) -> dict:
    """Publish version 0, start the readers, publish `publishes` more versions, collect the figures."""
    from collectivekv.cachestore.store.publish import current_version_id
    from collectivekv.pipeline.store.store_ops import build_store

    _, layout = model_and_layout()
    work = Path(work or tempfile.mkdtemp(prefix="ckv-conc-"))
    sources = [write_version_parquet(work / f"v{k}", layout, users, k, seed=k) for k in range(publishes + 1)]
    build_store(store, sources[0], command_line="concurrent_serving v0")
    ctx = mp.get_context("fork")
    stop, ready, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=reader_main, args=(str(store), users, batch, 100 + i, stop, ready, queue))
             for i in range(readers)]
    for p in procs:
        p.start()
    t_start = time.perf_counter()
    ready.set()
    time.sleep(warmup_s)
    pub = []
    for k in range(1, publishes + 1):
        t0 = time.perf_counter()
        m = build_store(store, sources[k], command_line=f"concurrent_serving v{k}")
        pub.append({"version": k, "version_id": m["version_id"], "seconds": round(time.perf_counter() - t0, 3),
                    "at_s": round(t0 - t_start, 3)})
        time.sleep(interval_s if k < publishes else tail_s)
    stop.set()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    wall = time.perf_counter() - t_start
    lat = np.array([x for r in results for x in r["latency_ms"]] or [np.nan])
    final = current_version_id(store)
    return {
        "readers": readers, "publishes": publishes, "users": users, "batch_users": batch,
        "candidates_per_user": N_CAND, "wall_s": round(wall, 2),
        "batches": sum(r["batches"] for r in results), "records_read": sum(r["records"] for r in results),
        "errors": sum(r["errors"] for r in results), "mixed_version_reads": sum(r["mixed"] for r in results),
        "records_lost": sum(r["lost"] for r in results),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3), "p99": round(float(np.percentile(lat, 99)), 3),
                       "max": round(float(lat.max()), 3), "mean": round(float(lat.mean()), 3)},
        "reader_exit_codes": [p.exitcode for p in procs],
        "per_reader": [{k: r[k] for k in ("pid", "batches", "errors", "mixed", "lost", "reopens", "open_retries",
                                          "versions_seen", "error_samples")} for r in results],
        "publish": pub, "final_version_id": final, "final_version_is_last_published": final == pub[-1]["version_id"],
        "device": "cpu", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                     "python": platform.python_version(), "load_avg": os.getloadavg()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--publishes", type=int, default=3)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=3.0)
    ap.add_argument("--tail", type=float, default=3.0)
    ap.add_argument("--out", default=str(RESULTS / "concurrent_serving.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckv-conc-") as tmp:
        res = run(Path(tmp) / "store", readers=args.readers, publishes=args.publishes, users=args.users,
                  batch=args.batch, warmup_s=args.warmup, interval_s=args.interval, tail_s=args.tail,
                  work=Path(tmp) / "src")
    res["command"] = "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    res["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("readers", "publishes", "batches", "records_read", "errors",
                                          "mixed_version_reads", "records_lost", "latency_ms")}, indent=2))


if __name__ == "__main__":
    main()
