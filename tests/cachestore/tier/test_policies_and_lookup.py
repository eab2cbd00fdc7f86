"""The resident tier's parts that need no store: the eviction policies (LRU, S3-FIFO: what they evict, that they
never exceed their capacity) and the key index + the Triton lookup kernel of the resident graph (== searchsorted
over keys spread evenly, clustered or over the whole int64 span)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.tier import LRUPolicy, S3FIFOPolicy, make_policy
from collectivekv.cachestore.tier import arena as arena_mod

# ------------------------------------------------------------------------------------------ policies


def test_lru_evicts_least_recently_used() -> None:
    p = LRUPolicy(3)
    assert [p.admit(u) for u in (1, 2, 3)] == [[], [], []]
    p.hit(1)  # order now 2, 3, 1
    assert p.admit(4) == [2] and p.admit(5) == [3]
    assert sorted(u for u in (1, 2, 3, 4, 5) if u in p) == [1, 4, 5]


def test_s3fifo_keeps_hit_users_and_drops_one_hit_wonders() -> None:
    p = S3FIFOPolicy(10)  # S holds 1, M 9
    p.admit(1)
    p.hit(1)  # hit while in S: promoted to M when S is next evicted
    evicted = [v for u in range(100, 130) for v in p.admit(u)]
    assert 1 in p and 1 not in evicted  # survived 30 one-hit wonders
    assert len(p) == 10
    wonder = evicted[-1]  # the latest evicted from S is in the ghost queue: readmitted straight into M
    p.admit(wonder)
    assert wonder in p and wonder in p._main


@given(name=st.sampled_from(["lru", "s3fifo"]), capacity=st.integers(1, 12),
       trace=st.lists(st.integers(0, 30), max_size=200))
@settings(max_examples=60, deadline=None)
def test_policies_never_exceed_capacity(name: str, capacity: int, trace: list[int]) -> None:
    """Any access sequence: at most ``capacity`` resident, evicted users are really gone, hits are residents."""
    p = make_policy(name, capacity)
    resident: set[int] = set()
    for u in trace:
        if u in p:
            assert u in resident
            p.hit(u)
            continue
        for v in p.admit(u):
            assert v in resident and v not in p
            resident.discard(v)
        resident.add(u)
        assert len(p) == len(resident) <= capacity
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("fifo", 3)


# ------------------------------------------------------------------------------------------ lookup kernel


def _keys(rng: np.random.Generator, n_keys: int, spread: str) -> np.ndarray:
    """n_keys distinct sorted int64 ids: spread evenly, in a few tight clusters far apart, or over the whole int64
    span (the directory then has one range)."""
    if spread == "even":
        return np.sort(rng.choice(5000, n_keys, replace=False)).astype(np.int64)
    if spread == "clusters":
        base = rng.choice([0, 1 << 20, 1 << 40, (1 << 61) - 1000], n_keys)
        return np.unique(base + rng.integers(0, 300, n_keys)).astype(np.int64)
    return np.unique(np.concatenate([[np.iinfo(np.int64).min + 5, np.iinfo(np.int64).max - 5],
                                     rng.integers(-(1 << 62), 1 << 62, n_keys)])).astype(np.int64)


@given(n_keys=st.integers(1, 400), seed=st.integers(0, 10_000), spread=st.sampled_from(["even", "clusters", "wide"]))
@settings(max_examples=30, deadline=None)
def test_key_index_ranges_hold_their_keys(n_keys: int, seed: int, spread: str) -> None:
    """Every key lies in its directory range, the ranges tile 0 .. E, and ``steps`` halvings search the widest."""
    keys = _keys(np.random.default_rng(seed), n_keys, spread)
    idx = arena_mod.key_index(keys, np.arange(len(keys)), np.arange(len(keys)), torch.device("cpu"))
    starts = idx.starts.numpy()
    assert starts[0] == 0 and starts[-1] == len(keys) and (np.diff(starts) >= 0).all()
    d = len(starts) - 1
    j = (keys - idx.kmin) >> idx.shift if d > 1 else np.zeros(len(keys), np.int64)
    pos = np.arange(len(keys))
    assert ((starts[j] <= pos) & (pos < starts[j + 1])).all()
    assert (1 << (idx.steps - 1)) > np.diff(starts).max()
    assert d == 1 or d <= max(1, len(keys) // 2)


@pytest.mark.skipif(arena_mod.triton is None, reason="needs Triton (CUDA, or its CPU interpreter)")
@given(n_keys=st.integers(1, 300), seed=st.integers(0, 10_000), spread=st.sampled_from(["even", "clusters", "wide"]))
@settings(max_examples=15, deadline=None)
def test_lookup_kernel_equals_searchsorted(n_keys: int, seed: int, spread: str) -> None:
    """The resident graph's Triton lookup (directory range, binary search, header, present, zero block, the
    candidates copied) == torch.searchsorted over keys spread evenly, clustered or over the whole int64 span; on
    CPU under Triton's interpreter (conftest), natively on CUDA with the ids and the candidates read from pinned
    host memory."""
    import triton

    rng = np.random.default_rng(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = _keys(rng, n_keys, spread)
    n_keys = len(keys)
    lo, hi = int(keys[0]), int(keys[-1])
    ids = np.concatenate([rng.choice(keys, 9), keys[:3] + 1, keys[-3:] - 1, rng.integers(-1, 5001, 9),
                          [-1, lo, hi, max(lo - 1, -(1 << 63)), min(hi + 1, (1 << 63) - 1),
                           -(1 << 63), (1 << 63) - 1]]).astype(np.int64)
    b = len(ids)
    index = arena_mod.key_index(keys, rng.integers(0, 1 << 40, n_keys), rng.integers(0, 50, n_keys),
                                torch.device(device))
    want_off, want_n, want_p = arena_mod.lookup(torch.from_numpy(ids).to(device), index.keys, index.offset,
                                                index.length, 16 * b)
    arena = torch.full((16 * b + 64,), 7, dtype=torch.uint8, device=device)
    present = torch.zeros(b, dtype=torch.bool, device=device)
    pin = device == "cuda"
    host_ids = torch.from_numpy(ids).pin_memory() if pin else torch.from_numpy(ids)
    src = torch.from_numpy(rng.integers(0, 1 << 40, 300)).pin_memory() if pin else torch.from_numpy(
        rng.integers(0, 1 << 40, 300))  # more candidates than ids: the programs cover both
    dst = torch.zeros(300, dtype=torch.int64, device=device)
    flags = torch.ones(b, dtype=torch.int32, device=device)
    arena_mod._lookup_kernel[(triton.cdiv(300, 256),)](
        host_ids, index.keys, index.offset, index.length, index.starts, index.kmin, index.kmax, index.shift,
        arena.view(torch.int64), present, b, n_keys, 2, src, dst, 300, flags, b, RANGES=index.starts.numel() > 2,
        STEPS=index.steps, BLOCK=256, ZBLOCK=2)
    head = arena[: 16 * b].view(torch.int64)
    assert torch.equal(head[:b], want_off) and torch.equal(head[b:], want_n) and torch.equal(present, want_p)
    assert torch.equal(dst.cpu(), src) and not flags.any()
    assert (arena[16 * b : 16 * b + 16] == 0).all() and (arena[16 * b + 16 :] == 7).all()
