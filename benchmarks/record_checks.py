"""What validating records and the store file costs on the serving path (CPU, one core).

    python benchmarks/record_checks.py [--lengths 50,1000] [--repeats 200]
        [--out benchmarks/results/record_checks/record_checks.json]

Builds the stores of ``benchmarks/decode_latency.py``'s fetch part (synthetic records, d_u 1, K and V
shared, fp16; 20,000 users at L <= 100, else 5,000; every page touched once first) and times, per batch
of B = 512 random users (median of --repeats batches):

- ``fetch_ms``: ``HostBatcher.fetch`` as served by default — lookups, copies, vectorised header and size
  checks of all 512 records;
- ``fetch_crc_ms``: the same with ``verify_crc=True`` — every record also CRC-checked
  (one ``zlib.crc32`` over the record) and its router indices checked against the pool (``ckv score``'s
  default);
- ``crc_only_ms``: the 512 ``zlib.crc32`` calls alone, over records already in memory;
- ``bounds_cpu_ms``: ``cachestore.decode.decode.bound_router_indices`` on the unpacked (B, L) indices on the
  CPU (on a GPU it is two elementwise kernels inside the decode);
- ``check_version_ms`` / ``check_tree_ms``: the file checks once per open: the cheap one (stat + two meta
  pages) and the full B-tree walk (``ckv store verify``, ``ckv score`` with CRC checks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_store import build_fetch_store  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from collectivekv.cachestore.decode.batch import HostBatcher  # noqa: E402
from collectivekv.cachestore.store.store_check import check_version  # noqa: E402
from collectivekv.cachestore.store.store_tree import check_tree  # noqa: E402

USERS = 512


class _Pool:
    """The cfg.collective.pool_size that bound_router_indices reads, without a model."""

    def __init__(self, pool_size: int) -> None:
        self.cfg = type("Cfg", (), {"collective": type("C", (), {"pool_size": pool_size})()})()


def _median_ms(fn: Callable[[np.ndarray], object], n: int, repeats: int, rng: np.random.Generator) -> float:
    times = []
    for _ in range(repeats):
        ids = rng.integers(0, n, USERS)
        t0 = time.perf_counter()
        fn(ids)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 4)


def _once_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 4)


def measure(length: int, n: int, repeats: int, tmp: Path) -> dict:
    """One row: the costs above at history length ``length`` in a store of ``n`` users."""
    import torch

    from collectivekv.cachestore.decode.decode import bound_router_indices, din_cache
    from collectivekv.cachestore.decode.transfer import to_device

    batcher, _ = build_fetch_store(tmp, length, n, USERS, pin=False, kv_dtype="float16")
    layout, reader = batcher.layout, batcher.reader
    crc = HostBatcher(layout, reader=reader, pin=False, verify_crc=True)
    rng = np.random.default_rng(0)
    held = crc.fetch(rng.integers(0, n, USERS))
    records = [bytes(held.record(b)) for b in range(USERS)]
    dev, _ = to_device(batcher.fetch(rng.integers(0, n, USERS)), "cpu")
    cache = din_cache(dev.unpack())
    pool = _Pool(layout.pool_size)
    row = {"L": length, "users_in_store": n, "record_bytes": layout.record_size(length),
           "lmdb_file_bytes": os.stat(reader.version_dir / "lmdb" / "data.mdb").st_size,
           "fetch_ms": _median_ms(batcher.fetch, n, repeats, rng),
           "fetch_crc_ms": _median_ms(crc.fetch, n, repeats, rng),
           "crc_only_ms": _once_ms(lambda: [zlib.crc32(r) for r in records], repeats),
           "bounds_cpu_ms": _once_ms(lambda: bound_router_indices(pool, cache, torch.zeros(USERS, dtype=torch.int32)),
                                     repeats),
           "check_version_ms": _once_ms(lambda: check_version(reader.version_dir)),
           "check_tree_ms": _once_ms(lambda: check_tree(reader.version_dir), 3)}
    row["crc_overhead"] = round(row["fetch_crc_ms"] / row["fetch_ms"], 3)
    reader.close()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="50,1000")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "record_checks" / "record_checks.json")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch

    torch.set_num_threads(1)
    info = machine(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="ckv-record-checks-") as tmp:
        rows = [measure(L, 20_000 if L <= 100 else 5_000, args.repeats, Path(tmp))
                for L in (int(x) for x in args.lengths.split(","))]
    out = {"benchmark": "record_checks", "machine": info, "device": "cpu (one core)",
           "command": "python " + " ".join(sys.argv), "users_per_batch": USERS, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
