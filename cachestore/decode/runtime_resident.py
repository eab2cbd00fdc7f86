"""The decode runtime's resident path (:mod:`cachestore.tier`): opening the tier a runtime serves from, and
scoring one step through it (one CUDA graph replay: user ids in, lookup on the device, scores out)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from collectivekv.cachestore.decode.runtime_stats import RuntimeStats
from collectivekv.cachestore.tier.graph import ResidentRequest
from collectivekv.cachestore.tier.tier import WHOLE, ResidentTier, TierCounters, plan_capacity


def open_tier(rt: Any) -> ResidentTier | None:
    """The resident tier of a :class:`cachestore.decode.runtime.DecodeRuntime` ``rt`` (see cachestore/tier):
    ``config.tier_bytes`` bytes, None = auto (:func:`cachestore.tier.plan_capacity`; off when ``zero_copy``
    asks for the map fetch), 0 = off."""
    tier_bytes = rt.config.tier_bytes
    if tier_bytes is None and rt.config.zero_copy:
        return None
    capacity = plan_capacity(tier_bytes, rt.device, rt.reader, rt.config.tier_share)
    if capacity <= 0:
        return None
    if rt.pad_to is not None and rt.pad_to < rt.layout.max_len:  # the tier decodes every request at L = pad_to
        raise ValueError(f"pad_to {rt.pad_to} < the store's max_len {rt.layout.max_len}: the resident tier would cut "
                         "longer histories; give pad_to >= max_len (or none), or tier_bytes=0")
    return ResidentTier(rt.reader, rt.device, capacity, policy=rt.config.policy,
                        batch_users=rt.batch_users, expected_model_version=rt.model_version,
                        verify_crc=rt.config.verify_crc)


def score_resident(rt: Any, ids: np.ndarray, cand: np.ndarray, stats: RuntimeStats, slots: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One step of :class:`cachestore.decode.runtime.DecodeRuntime` ``rt`` through its resident tier: ``slots`` users
    (cold padding), L = graph_len, one graph replay on CUDA (:class:`cachestore.tier.graph.ResidentRequest`;
    eager on CPU)."""
    t0 = time.perf_counter()
    tier, n, width = rt.tier, len(ids), cand.shape[1]
    key = (slots, width)
    if key not in rt._resident:
        rt._resident[key] = ResidentRequest(rt._graph(slots, width), tier)
    padded = np.zeros((slots, width), dtype=np.int64)
    padded[:n] = cand
    first = np.full(slots, -1, dtype=np.int64)
    with tier.lock:  # resolve → replay enqueued: no admission rewrites a slot this batch reads
        if tier.mode == WHOLE:
            first[:n], second, counters = ids, None, None
        else:
            resolved = tier.resolve(ids)
            first[:n], second, counters = resolved.src, np.zeros(slots, dtype=np.int64), resolved.counters
            second[:n] = resolved.n
        t_dec = time.perf_counter()
        logits, present = rt._resident[key].run(first, second, padded)
        bad = rt._resident[key].bad_slots()
    rt._check_flags(bad[bad < n], ids)
    present = present[:n]
    stats.batches += 1
    stats.users += n
    stats.cold_start_users += int((~present).sum())
    if counters is None:  # whole store: every present user is resident
        counters = TierCounters(hits=int(present.sum()), cold=int((~present).sum()))
        tier._count(counters)
    stats.tier_hits += counters.hits
    stats.tier_misses += counters.misses
    evictions = tier.counters.evictions
    stats.tier_evictions += evictions - rt._evictions_seen
    rt._evictions_seen = evictions
    errors = tier.counters.admission_errors
    stats.tier_admission_errors += errors - rt._errors_seen
    rt._errors_seen = errors
    stats.h2d_bytes += rt._resident[key].input_bytes()
    stats.fetch_ms += (t_dec - t0) * 1e3
    stats.decode_ms += (time.perf_counter() - t_dec) * 1e3
    stats.total_ms += (time.perf_counter() - t0) * 1e3
    return logits[:n], ~present
