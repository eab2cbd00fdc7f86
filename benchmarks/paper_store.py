"""The din model and its collective store at the paper's scale (Table 2): the model with random weights
(:func:`paper_model`), the store's layout (:func:`collective_layout`) and synthetic records of full
histories (:func:`synthetic_records`); the Parquet and the published LMDB store the nightly job builds of
them (:func:`write_fetch_parquet`, :func:`build_fetch_store`), and the LMDB → host-buffer fetch + pack
benchmark over that store on one CPU core (:func:`fetch_benchmark`: ``decode_latency.py``'s fetch part).
"""

from __future__ import annotations

import os
import secrets
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import ResidentModel
from collectivekv.cachestore.store.entry import EntryLayout, encode_entry, entry_layout
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.ctr import TargetAttentionCTR

PAPER = {"embed_dim": 64, "d_attn": 256, "n_heads": 8, "d_user": 1, "pool_size": 10_000}
N_ITEMS = 100_000


def paper_config(max_len: int) -> ModelConfig:
    """The din model's config at the paper's shape (:data:`PAPER`) with histories of ``max_len``."""
    return ModelConfig(n_items=N_ITEMS, embed_dim=PAPER["embed_dim"], d_attn=PAPER["d_attn"], n_heads=PAPER["n_heads"],
                       max_len=max_len, collective=CollectiveConfig(d_user=PAPER["d_user"],
                                                                    pool_size=PAPER["pool_size"]))


def paper_model(max_len: int, device: torch.device) -> ResidentModel:
    torch.manual_seed(0)
    return ResidentModel(TargetAttentionCTR(paper_config(max_len)).eval(), device)


def collective_layout(max_len: int, version: str, kv_dtype: str = "float16") -> EntryLayout:
    return entry_layout(paper_config(max_len), version, "collective", kv_dtype)


def synthetic_records(layout: EntryLayout, n_users: int, length: int, seed: int) -> list[bytes]:
    """Records of users with full histories: N(0,1) user parts at the layout's kv dtype (float16 or
    float32), uniform router indices."""
    rng = np.random.default_rng(seed)
    d = PAPER["d_user"]
    k = rng.standard_normal((n_users, length, d)).astype(layout.kv_dtype)
    v = rng.standard_normal((n_users, length, d)).astype(layout.kv_dtype)
    idx = rng.integers(0, layout.pool_size, (n_users, 2, length, 1)).astype(np.uint16)
    return [encode_entry(layout, length, [k[u], v[u], idx[u, 0], idx[u, 1]]) for u in range(n_users)]


def write_fetch_parquet(pdir: Path, layout: EntryLayout, n: int) -> None:
    """Prefill Parquet (+ _layout.json) in ``pdir`` of users 0..n-1 with full histories of layout.max_len
    behaviours: synthetic records (4,096 distinct ones reused cyclically), as the nightly job writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, prefill_schema
    from collectivekv.cachestore.store.record import write_layout

    length = layout.max_len
    records = synthetic_records(layout, min(n, 4096), length, seed=7)
    payloads = [r[32:] for r in records]  # header-less payloads, reused cyclically
    rows = {"user_id": np.arange(n, dtype=np.int64), "length": np.full(n, length, np.int32)}
    parts = [payloads[u % len(payloads)] for u in range(n)]
    rows["payload"] = parts
    rows["model_version"] = [layout.model_version] * n
    rows["checksum"] = [zlib.crc32(p) for p in parts]
    pdir.mkdir(parents=True)
    pq.write_table(pa.table(rows, schema=prefill_schema()), pdir / "part-0.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)


def build_fetch_store(tmp: Path, length: int, n: int, batch_users: int, pin: bool,
                      kv_dtype: str) -> tuple[HostBatcher, float]:
    """A published LMDB store of ``n`` users with full histories of ``length`` behaviours (synthetic
    records, 4,096 distinct ones reused cyclically) under ``tmp``, built from Parquet the way the
    nightly job builds it, opened read-only, every page touched once (a long-running server's steady
    state): (its HostBatcher with ``reader``, seconds the build took)."""

    from collectivekv.cachestore.store.publish import build_and_publish
    from collectivekv.cachestore.store.reader import StoreReader

    layout = collective_layout(length, secrets.token_hex(8), kv_dtype)
    root = tmp / f"store-{length}"
    write_fetch_parquet(root / "parquet", layout, n)
    t0 = time.perf_counter()
    build_and_publish(root, parquet="none")
    build_s = time.perf_counter() - t0
    batcher = HostBatcher(layout, reader=StoreReader.open_current(root), pin=pin, n_buffers=2, batch_users=batch_users)
    for lo in range(0, n, batch_users):
        batcher.fetch(np.arange(lo, min(lo + batch_users, n)))
    return batcher, build_s


def fetch_benchmark(lengths: list[int], batch_sizes: list[int], users: dict[int, int], repeats: int,
                    pin: bool, kv_dtype: str) -> dict:
    """LMDB → host buffer fetch + pack (HostBatcher.fetch) per batch size, on one CPU core; and the
    zero-copy fetch (MappedBatcher.fetch: lookups + gather table, the GPU gathers the records) as
    ``zero_copy`` (each timed in consecutive calls, copying first)."""
    from collectivekv.cachestore.decode.mapped import MappedBatcher

    try:
        import lmdb  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"needs lmdb and pyarrow: {exc}"}
    out: dict = {"cpu_affinity": None, "threads": 1, "pinned": pin}
    old_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    old_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="ckv-fetch-bench-") as tmp:
        for length in lengths:
            n = users[length]
            batcher, build_s = build_fetch_store(Path(tmp), length, n, max(batch_sizes), pin, kv_dtype)
            reader = batcher.reader
            if old_affinity:
                core = min(old_affinity)
                os.sched_setaffinity(0, {core})
                out["cpu_affinity"] = core
            torch.set_num_threads(1)
            rng = np.random.default_rng(0)
            res = {"users_in_store": n, "build_seconds": round(build_s, 2),
                   "data_mdb_bytes": (reader.version_dir / "lmdb" / "data.mdb").stat().st_size}
            zero_copy = MappedBatcher(batcher.layout, reader=reader, pin=pin, batch_users=max(batch_sizes))
            res["zero_copy"] = {}
            try:
                for b in batch_sizes:
                    for way, fetcher, into in (("copy", batcher, res), ("zero_copy", zero_copy, res["zero_copy"])):
                        times = []
                        for _ in range(repeats):
                            ids = rng.integers(0, n, b)
                            t = time.perf_counter()
                            host = fetcher.fetch(ids)
                            times.append((time.perf_counter() - t) * 1e3)
                        times.sort()
                        into[str(b)] = {"median_ms": statistics.median(times),
                                        "p90_ms": times[int(0.9 * (len(times) - 1))],
                                        "bytes": host.used_bytes if way == "copy" else 40 * b,
                                        "users_per_s": b / statistics.median(times) * 1e3}
            finally:
                if old_affinity:
                    os.sched_setaffinity(0, old_affinity)
                torch.set_num_threads(old_threads)
                zero_copy.close()
                reader.close()
            out[str(length)] = res
            for way, r in (("copy", res), ("zero-copy", res["zero_copy"])):
                m = r.get("512", {}).get("median_ms")
                verdict = f"  (512 users: {'PASS' if m <= 1.0 else 'FAIL'} vs 1 ms)" if m is not None else ""
                print(f"fetch ({way}) L={length}: " + "  ".join(f"B={b} {r[str(b)]['median_ms']:.3f} ms"
                                                                for b in batch_sizes) + verdict, flush=True)
    return out
