"""Resident-tier hit rate vs capacity, LRU against S3-FIFO, on a synthetic Zipf request trace (CPU).

    python benchmarks/tier_hit_rate.py [--users 10000000] [--requests 4000000] [--alpha 0.9]
                                       [--capacities 0.05,0.1,0.2,0.5] [--out benchmarks/results/tier_hit_rate]

The trace (:func:`zipf_trace`): ``--requests`` user ids drawn i.i.d. from a Zipf law over ``--users`` users —
the user of popularity rank r (1-based) is requested with probability r^-α / Σ_k k^-α — with ranks mapped
to user ids by a random permutation (popularity unrelated to id order, as in a store keyed by user id).
α = 0.9 by default: the skew reported for user activity in recommendation logs lies around 0.7–1.0; lower
α is harder for any cache. Each policy (:mod:`cachestore.tier.policy`, the code the tier runs) replays the
trace at each capacity (a fraction of the users, uniform slots: the tier's cache mode): a resident user is a
hit, any other is admitted at once (evicting). The first half of the trace warms the cache; hit rates are
over the second half, overall and per batch of 512 requests (mean and 10th percentile), beside the bound
no policy beats (an infinite tier, which misses only a user's first request). Writes
``tier_hit_rate.json`` and ``tier_hit_rate.png`` under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collectivekv.cachestore.tier.policy import make_policy  # noqa: E402

BATCH = 512


def zipf_trace(n_users: int, n_requests: int, alpha: float, seed: int = 0) -> np.ndarray:
    """(n_requests,) int64 user ids in [0, n_users): Zipf(α) over popularity ranks, ranks → ids by a random
    permutation (see the module docstring). Exact for any α > 0 (inverse CDF over all n_users ranks)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, n_users + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n_requests), side="right")  # 0-based rank
    ranks = np.minimum(ranks, n_users - 1)
    return rng.permutation(n_users)[ranks].astype(np.int64)


def replay(policy_name: str, capacity: int, trace: list[int], warm: int) -> dict:
    """Hit rate of ``policy_name`` with ``capacity`` slots over trace[warm:] (trace[:warm] warms it)."""
    policy = make_policy(policy_name, capacity)
    contains, hit, admit = policy.__contains__, policy.hit, policy.admit
    hits = np.zeros(len(trace), dtype=bool)
    evictions = 0
    t0 = time.perf_counter()
    for i, u in enumerate(trace):
        if contains(u):
            hit(u)
            hits[i] = True
        else:
            evictions += len(admit(u))
    seconds = time.perf_counter() - t0
    measured = hits[warm:]
    per_batch = measured[: len(measured) // BATCH * BATCH].reshape(-1, BATCH).mean(1)
    return {"hit_rate": round(float(measured.mean()), 4), "batch_hit_rate_mean": round(float(per_batch.mean()), 4),
            "batch_hit_rate_p10": round(float(np.quantile(per_batch, 0.1)), 4), "evictions": evictions,
            "requests_per_second": round(len(trace) / seconds)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    fractions = [float(f) for f in result["capacities"]]
    for name, color in (("lru", "C0"), ("s3fifo", "C3")):
        ax.plot([100 * f for f in fractions], [100 * result["capacities"][str(f)][name]["hit_rate"] for f in fractions],
                "-o", color=color, label=name.upper().replace("S3FIFO", "S3-FIFO"))
    ax.axhline(100 * result["infinite_capacity_hit_rate"], color="grey", ls="--", lw=0.8,
               label="infinite tier (first requests miss)")
    ax.set(xlabel="tier capacity (% of users)", ylabel="hit rate (%)",
           title=f"Zipf α={result['alpha']}, {result['users']:,} users, {result['requests']:,} requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=10_000_000)
    p.add_argument("--requests", type=int, default=4_000_000)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--capacities", default="0.05,0.1,0.2,0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tier_hit_rate")
    args = p.parse_args()
    t0 = time.perf_counter()
    trace = zipf_trace(args.users, args.requests, args.alpha, args.seed)
    distinct = int(len(np.unique(trace)))
    print(f"trace: {args.requests:,} requests, {distinct:,} distinct users ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    ids, warm = trace.tolist(), args.requests // 2
    _, first = np.unique(trace, return_index=True)  # the bound no policy beats: an infinite tier misses first
    seen_before = np.ones(len(trace), dtype=bool)  # requests only
    seen_before[first] = False
    infinite = round(float(seen_before[warm:].mean()), 4)
    result: dict = {"benchmark": "tier_hit_rate", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    "machine": {"python": platform.python_version(), "platform": platform.platform()},
                    "users": args.users, "requests": args.requests, "alpha": args.alpha, "seed": args.seed,
                    "distinct_users_in_trace": distinct, "warm_up_requests": warm,
                    "infinite_capacity_hit_rate": infinite, "batch": BATCH, "capacities": {}}
    for fraction in (float(f) for f in args.capacities.split(",")):
        row = {name: replay(name, max(1, int(fraction * args.users)), ids, warm) for name in ("lru", "s3fifo")}
        result["capacities"][str(fraction)] = row
        print(f"capacity {fraction:.0%}: " + json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tier_hit_rate.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'tier_hit_rate.json'}")
    plot(result, args.out / "tier_hit_rate.png")


if __name__ == "__main__":
    main()
