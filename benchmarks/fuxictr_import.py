"""What `ckv data import --format fuxictr` costs (pipeline/data/fuxictr_import.py): a synthetic dataset in
LongCTR's layout is written (untimed), then imported once (timed, one process).

    python benchmarks/fuxictr_import.py --work /tmp/ckv-fx --out benchmarks/results/fuxictr_import/fuxictr_import.json

The synthetic source: ``--users`` users whose ``full_item_seq`` lengths are uniform in 1..``--max-seq``, items
uniform over ``--items`` (item_info with a cate_id of 500 values), ``--samples`` rows split 80/10/10 into
train / valid / test with a uniform seq_len in 0..the user's length and a 30% click rate (numpy generator seed 0).
Reported: wall seconds of the import (read, build, validate, write), the process's peak resident memory, the
sizes of source and output.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collectivekv.pipeline.data.fuxictr_import import FuxiCTRImportConfig, import_fuxictr  # noqa: E402


def write_source(dst: Path, users: int, items: int, max_seq: int, samples: int) -> int:
    """The synthetic LongCTR dataset (module docstring) in ``dst``; returns the number of behaviours."""
    rng = np.random.default_rng(0)
    dst.mkdir(parents=True, exist_ok=True)
    lengths = rng.integers(1, max_seq + 1, users)  # (U,)
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # (U + 1,)
    seqs = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(rng.integers(1, items, offsets[-1])))
    pq.write_table(pa.table({"user_index": np.arange(users), "full_item_seq": seqs}), dst / "user_info.parquet")
    pq.write_table(pa.table({"item_index": np.arange(items), "item_id": np.arange(items),
                             "cate_id": rng.integers(0, 500, items)}), dst / "item_info.parquet")
    for split, share in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        n = int(samples * share)
        user = rng.integers(0, users, n)
        pq.write_table(pa.table({"user_index": user, "item_index": rng.integers(1, items, n),
                                 "seq_len": (rng.random(n) * (lengths[user] + 1)).astype(np.int64),
                                 "is_click": (rng.random(n) < 0.3).astype(np.float64)}), dst / f"{split}.parquet")
    return int(offsets[-1])


def size_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (replaced)")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--max-seq", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1_000_000)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    behaviours = write_source(args.work / "source", args.users, args.items, args.max_seq, args.samples)
    t0 = time.perf_counter()
    meta = import_fuxictr(FuxiCTRImportConfig(source=args.work / "source", out=args.work / "data"))
    seconds = time.perf_counter() - t0
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "source": {"users": args.users, "items": args.items, "max_seq": args.max_seq, "samples": args.samples,
                   "behaviours": behaviours, "mib": size_mib(args.work / "source")},
        "dataset": {"users": meta["n_users"], "items": meta["n_items"], "samples": meta["counts"]["events"],
                    "behaviours": meta["counts"]["behaviours"], "mib": size_mib(args.work / "data")},
        "import_seconds": round(seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
