"""The resident tier: store records held on the serving device (GPU memory; host memory on CPU).

    tier.py     ResidentTier — whole-store or cache mode, capacity plan, host index, admission thread
    arena.py    the arena layout and the device-side batch build (the key index and its lookup, header, gather)
    policy.py   eviction policies: LRU and S3-FIFO
    graph.py    the CUDA graph of a resident request (ids in → lookup → gather → decode)

Every model's store (din and the zoo: records are kept verbatim; each record's header states its n).
docs/serving.md describes the design, the capacity rule and the measured hit rates and latencies.
"""

from collectivekv.cachestore.tier.policy import LRUPolicy, S3FIFOPolicy, make_policy
from collectivekv.cachestore.tier.tier import ResidentTier, Resolved, TierCounters, plan_capacity

__all__ = ["LRUPolicy", "S3FIFOPolicy", "make_policy", "ResidentTier", "Resolved", "TierCounters", "plan_capacity"]
