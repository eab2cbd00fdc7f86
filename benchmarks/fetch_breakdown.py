"""Where the LMDB fetch + pack of a 512-user batch goes, on one CPU core (issue target: <= 1 ms).

    python benchmarks/fetch_breakdown.py [--lengths 50,1000]
                                         [--out benchmarks/results/fetch_breakdown/fetch_breakdown.json]

Builds the same stores as ``benchmarks/decode_latency.py``'s fetch part (100,000 users at L <= 100,
else 20,000; every page touched once first, as in a long-running server), pins the process to one
core and times, per batch of 512 random users (median of --repeats batches):

- ``fetch``: ``HostBatcher.fetch`` — the whole serving step (keys, lookups, copies, header checks);
- ``keys``: building the 512 big-endian keys only;
- ``get``: one read transaction, ``txn.get`` per key (zero-copy views of the map);
- ``get_sorted``: the same in key order (B-tree locality);
- ``getmulti``: ``Cursor.getmulti`` (py-lmdb's C loop over the keys);
- ``get_copy``: ``get`` + one slice copy per record into a preallocated buffer (fetch without checks);
- ``zero_copy``: ``MappedBatcher.fetch`` — lookups, addresses, header checks and the gather table, no
  record copied (``cachestore/decode/mapped.py``; the GPU gathers the records from the map).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_store import build_fetch_store  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from collectivekv.cachestore.decode.batch import KEY  # noqa: E402
from collectivekv.cachestore.decode.mapped import MappedBatcher  # noqa: E402

USERS = 512


def breakdown(length: int, n: int, repeats: int, tmp: Path) -> dict:
    batcher, _ = build_fetch_store(tmp, length, n, USERS, pin=False, kv_dtype="float16")
    layout, reader = batcher.layout, batcher.reader
    env = reader._environment()
    scratch = memoryview(bytearray(USERS * layout.record_size(length) + 8 * USERS))
    rng = np.random.default_rng(0)

    def keys(ids: np.ndarray) -> list[bytes]:
        return list(map(KEY.pack, ids.tolist()))

    def get(ids: np.ndarray, ordered: bool = False) -> list:
        ks = sorted(keys(ids)) if ordered else keys(ids)
        with env.begin(buffers=True) as txn:
            return [txn.get(k) for k in ks]

    def getmulti(ids: np.ndarray) -> list:
        with env.begin(buffers=True) as txn:
            return txn.cursor().getmulti(keys(ids))

    def get_copy(ids: np.ndarray) -> int:
        pos = 0
        with env.begin(buffers=True) as txn:
            for value in map(txn.get, keys(ids)):
                end = pos + len(value)
                scratch[pos:end] = value
                pos = (end + 7) & -8
        return pos

    def ms(fn: Callable[[np.ndarray], object]) -> float:
        times = []
        for _ in range(repeats):
            ids = rng.integers(0, n, USERS)
            t0 = time.perf_counter()
            fn(ids)
            times.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(times), 4)

    zero_copy = MappedBatcher(layout, reader=reader, pin=False)
    steps = {"fetch": batcher.fetch, "keys": keys, "get": get, "get_sorted": lambda ids: get(ids, True),
             "getmulti": getmulti, "get_copy": get_copy, "zero_copy": zero_copy.fetch}
    row = {"L": length, "users_in_store": n, "record_bytes": layout.record_size(length),
           **{f"{name}_ms": ms(fn) for name, fn in steps.items()}}
    reader.close()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="50,1000")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fetch_breakdown/fetch_breakdown.json")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch

    info = machine(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="ckv-fetch-breakdown-") as tmp:
        rows = [breakdown(L, 100_000 if L <= 100 else 20_000, args.repeats, Path(tmp))
                for L in (int(x) for x in args.lengths.split(","))]
    out = {"benchmark": "fetch_breakdown", "machine": info, "command": " ".join(sys.argv), "users": USERS,
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
