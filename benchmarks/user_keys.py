"""What keying text user ids costs (cachestore/store/user_keys.py, scheme blake2b-63): timed on N distinct ids,
extrapolated to a larger user base (default 100M).

    python benchmarks/user_keys.py --n 10000000 --base 100000000 --out benchmarks/results/user_keys/user_keys.json

Timed steps (one process, one core; the ids are 32-hex-character strings, as a hashed id or a UUID without
dashes, generated untimed):
  hash        ``hash_texts``: one hashlib.blake2b(digest_size=8) per id, digests joined into an int64 array
  collisions  ``first_collision``: the stable argsort of the keys, equal neighbours compared
  prepare     ``pipeline.event_values.key_ids`` on a column of the N ids (what ``ckv data prepare`` does per
              distinct user: factorize, hash, collision check)
  request     ``to_keys`` of one 512-id request (the serving path), median of 200
Extrapolation: hashing is linear in N, the argsort N log N; ``prepare`` is also timed on N / 10 ids and
grown to the base by its measured growth per tenfold (factorizing N distinct strings grows faster than N:
the hash table outgrows the caches). The probability that two of the base's ids share a key is about
base² / 2**64.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collectivekv.cachestore.store.user_keys import BLAKE2B_63, first_collision, hash_texts, to_keys  # noqa: E402
from collectivekv.pipeline.data.event_values import key_ids  # noqa: E402


def make_ids(n: int, seed: int = 0) -> list[str]:
    """n distinct 32-hex-character ids (random 128-bit values; a duplicate is astronomically unlikely)."""
    raw = np.random.default_rng(seed).bytes(16 * n).hex()
    return [raw[32 * i: 32 * i + 32] for i in range(n)]


def timed(fn, *args):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000, help="distinct ids timed")
    ap.add_argument("--base", type=int, default=100_000_000, help="user base to extrapolate to")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args()
    n, base = args.n, args.base

    ids, t_make = timed(make_ids, n)
    keys, t_hash = timed(hash_texts, ids)
    clash, t_coll = timed(first_collision, ids, keys)
    assert clash is None and len(np.unique(keys)) == n
    column = pd.Series(ids, dtype=object)
    keyed, t_prep = timed(key_ids, column, "string", "benchmark: column 'user'", "--user-ids")
    assert keyed.scheme == BLAKE2B_63 and np.array_equal(keyed.keys, keys)
    del keyed
    _, t_prep_tenth = timed(key_ids, column.iloc[: n // 10].reset_index(drop=True), "string", "w", "--user-ids")
    request = ids[:512]
    per_request = []
    for _ in range(200):
        _, t = timed(to_keys, request, BLAKE2B_63)
        per_request.append(t)

    scale = base / n
    sort_scale = scale * math.log(base) / math.log(n)
    growth = t_prep / t_prep_tenth  # per tenfold
    prep_base = t_prep * growth ** math.log10(scale)
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "n": n,
        "id": "32 hex characters",
        "seconds": {"generate_untimed": round(t_make, 2), "hash": round(t_hash, 2), "collisions": round(t_coll, 2),
                    "prepare_key_ids": round(t_prep, 2), f"prepare_key_ids_{n // 10}": round(t_prep_tenth, 2)},
        "prepare_growth_per_tenfold": round(growth, 2),
        "ns_per_id": {"hash": round(1e9 * t_hash / n, 1), "prepare_key_ids": round(1e9 * t_prep / n, 1)},
        "request_512_ids_us": {"median": round(1e6 * float(np.median(per_request)), 1),
                               "p99": round(1e6 * float(np.quantile(per_request, 0.99)), 1)},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "extrapolated": {
            "base": base,
            "hash_seconds": round(t_hash * scale, 1),
            "collisions_seconds": round(t_coll * sort_scale, 1),
            "prepare_key_ids_seconds": round(prep_base, 1),
            "prepare_key_ids_seconds_if_linear": round(t_prep * scale, 1),
            "key_array_gib": round(8 * base / 2**30, 2),
            "collision_probability": float(f"{base * (base - 1) / 2 / 2**63:.3g}"),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
