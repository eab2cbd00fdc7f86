"""Calibrate `ckv capacity` against real stores: build stores with the real Parquet → LMDB builder
(cachestore.store.publish.build_and_publish) at the paper's layout and compare the capacity model's predictions
with the measured sizes (pipeline.reports.size_report.store_sizes). Also measures any existing stores given.

    python scripts/capacity_calibration.py [--users 100000] [--full-users 3000] [--store STORE ...]
        [--out benchmarks/results/capacity_calibration/capacity_calibration.json]

Synthetic stores: d_a 256, d_u 1, pool 10,000, fp16 K/V parts, uint16 indices; history lengths drawn
from the log-normal the capacity model fits to the paper's MicroVideo figures (p50 122, p90 253,
max 1,000, Appendix G); payload bytes random (incompressible). For each store two predictions:
``own``: from the store's own length distribution; ``fit``: from ``mean,p50,p90,max`` alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collectivekv.cachestore.store.entry import EntryLayout  # noqa: E402
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, prefill_schema  # noqa: E402
from collectivekv.cachestore.store.publish import build_and_publish  # noqa: E402
from collectivekv.cachestore.store.record import write_layout  # noqa: E402
from collectivekv.pipeline.reports.capacity import CacheFormat, capacity_plan, dist_from_quantiles  # noqa: E402
from collectivekv.pipeline.reports.capacity_inputs import store_calibration, store_format, store_lengths  # noqa: E402
from collectivekv.pipeline.reports.size_report import store_sizes  # noqa: E402

VERSION = "c0ffee00c0ffee00"
SPEC = (150.0, 122.0, 253.0, 1000)  # mean (given, not fitted), p50, p90, max


def synthetic_store(root: Path, layout: EntryLayout, lengths: np.ndarray, seed: int) -> Path:
    """Publish a store of len(lengths) users with random payloads of the layout's sizes."""
    g = np.random.default_rng(seed)
    pdir = root / "parquet"
    pdir.mkdir(parents=True)
    per_file = 20_000
    for f, start in enumerate(range(0, len(lengths), per_file)):
        rows = []
        for uid in range(start, min(start + per_file, len(lengths))):
            n = int(lengths[uid])
            payload = g.bytes(int(layout.record_size(n)) - 32)
            rows.append({"user_id": uid, "length": n, "payload": payload, "model_version": VERSION,
                         "checksum": zlib.crc32(payload)})
        pq.write_table(pa.Table.from_pylist(rows, schema=prefill_schema()), pdir / f"part-{f:05d}.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    build_and_publish(root, progress=False)
    return root


def measure(store: Path, label: str) -> dict:
    s = store_sizes(store)
    got = s["bytes"]
    cal, fmt = store_calibration(store), store_format(store)
    out = {"store": label, "mode": s["mode"], "users": s["users"], "behaviours": s["behaviours"],
           "kv_dtype": s["kv_dtype"], "bytes_per_behaviour": s["bytes_per_behaviour"],
           "measured": {k: got[k] for k in ("payload", "records", "lmdb_disk")},
           "measured_lmdb_overhead": got["lmdb_disk"] / got["records"]}
    preds = {"own": store_lengths(store)}
    if label.startswith("synthetic"):
        preds["fit"] = dist_from_quantiles(*SPEC)
    for name, dist in preds.items():
        col = capacity_plan(cal.users, dist, fmt)[cal.mode]["total"]
        out[f"predicted_{name}"] = {k: col[k] for k in ("payload", "records", "lmdb_disk")}
        out[f"error_{name}"] = {k: col[k] / got[k] - 1 for k in ("payload", "records", "lmdb_disk")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--full-users", type=int, default=3_000)
    p.add_argument("--store", action="append", default=[], help="existing stores to measure as well")
    p.add_argument("--out", type=Path,
                   default=ROOT / "benchmarks/results/capacity_calibration/capacity_calibration.json")
    a = p.parse_args()
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="ckv-capcal-") as tmp:
        dist = dist_from_quantiles(*SPEC)
        lays = CacheFormat(d_attn=256, d_user=1, pool_size=10_000, max_len=1000).layouts()
        coll, full = (dataclasses.replace(lays[m], model_version=VERSION) for m in ("collective", "full"))
        for label, layout, users, seed in (("synthetic collective", coll, a.users, 1),
                                           ("synthetic full", full, a.full_users, 2)):
            lengths = np.random.default_rng(seed).choice(dist.lengths, size=users, p=dist.probs)  # i.i.d. draws
            store = synthetic_store(Path(tmp) / label.replace(" ", "_"), layout, lengths, seed)
            results.append(measure(store, f"{label} ({users:,} users)"))
            print(json.dumps(results[-1]), flush=True)
        for s in a.store:
            results.append(measure(Path(s), s))
            print(json.dumps(results[-1]), flush=True)
    worst = max(abs(v) for r in results for k in ("error_own", "error_fit") for v in r.get(k, {}).values())
    doc = {"benchmark": "capacity_calibration", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "machine": {"python": platform.python_version(), "platform": platform.platform()},
           "length_spec": ",".join(f"{x:g}" for x in SPEC), "seconds": round(time.time() - t0, 1),
           "worst_abs_error": worst, "target": 0.05, "results": results}
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {a.out}; worst |error| {worst:.3%}")


if __name__ == "__main__":
    main()
