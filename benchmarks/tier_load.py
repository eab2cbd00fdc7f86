"""Whole-store load of the resident tier: records per second from LMDB into the arena (CPU; any device).

    python benchmarks/tier_load.py [--device cpu] [--out benchmarks/results/tier_load/tier_load.json]

Stores are built as ``benchmarks/serving_latency.py`` builds them (fp16, 100,000 users at L 50, 20,000 at
L 1,000); the time is ``ResidentTier(...)`` in whole-store mode: the size pass, every record copied through
the staging buffer with its header and CRC checked, the arena and index moved to the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_store import build_fetch_store  # noqa: E402
from collectivekv.cachestore.tier.tier import ResidentTier  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tier_load/tier_load.json")
    args = p.parse_args()
    rows = {}
    for length, users in ((50, 100_000), (1000, 20_000)):
        with tempfile.TemporaryDirectory(prefix="ckv-tier-load-") as tmp:
            batcher, _ = build_fetch_store(Path(tmp), length, users, 512, False, "float16")
            t0 = time.perf_counter()
            tier = ResidentTier(batcher.reader, torch.device(args.device), 1 << 40)
            seconds = time.perf_counter() - t0
            rows[str(length)] = {"users": users, "bytes": tier.resident_bytes, "seconds": round(seconds, 3),
                                 "records_per_second": round(users / seconds),
                                 "mb_per_second": round(tier.resident_bytes / seconds / 1e6, 1)}
            print(f"L {length}: " + json.dumps(rows[str(length)]), flush=True)
            tier.close()
    result = {"benchmark": "tier_load", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": {"python": platform.python_version(), "platform": platform.platform(), "device": args.device},
              "lengths": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
