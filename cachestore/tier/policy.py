"""Admission and eviction policies of the resident tier: which users keep a slot when the store does not fit.

A policy only tracks user ids in ``capacity`` slots; it never sees bytes (the tier, :mod:`cachestore.tier.tier`,
maps users to slots of its arena). The protocol, used by the tier and by ``benchmarks/tier_hit_rate.py``:

    uid in policy      -> bool        resident now?
    policy.hit(uid)                   a request found uid resident (recency / frequency update)
    policy.admit(uid)  -> list[int]   make uid resident (it must not be); returns the users evicted for it
                                      (at most capacity entries are ever resident; the list may be empty)
    len(policy)        -> int         resident users

Two policies (``make_policy(name, capacity)``):

- ``lru`` — least recently used: one ordered dict, a hit moves the user to the front, admission evicts the
  back. The baseline of NVIDIA's recsys KV cache manager and HugeCTR's embedding cache.
- ``s3fifo`` — S3-FIFO (Yang et al., SOSP 2023: "FIFO queues are all you need for cache eviction"):
  a small FIFO S (10% of the slots) takes new users, a main FIFO M the rest, a ghost FIFO G remembers the
  ids (no data) of the last |M| users evicted from S. Each resident user has a 2-bit frequency (0..3,
  +1 per hit). Evicting from S: the oldest user moves to M if it was hit (freq >= 1; the freq is reset),
  else it leaves (its id goes to G). Evicting from M: the oldest user is reinserted with freq - 1 if
  freq > 0, else it leaves. A user found in G is admitted straight into M. On a Zipf trace one-hit
  wonders leave through S quickly, so popular users stay: it beats LRU at every capacity measured
  (``benchmarks/results/tier_hit_rate/``).

Both are O(1) per request (amortised for S3-FIFO) and not thread-safe: the tier calls them under its lock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Protocol


class Policy(Protocol):
    capacity: int

    def __contains__(self, uid: int) -> bool: ...
    def __len__(self) -> int: ...
    def hit(self, uid: int) -> None: ...
    def admit(self, uid: int) -> list[int]: ...


class LRUPolicy:
    """Least recently used over ``capacity`` slots (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 slot, got {capacity}")
        self.capacity = capacity
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def __contains__(self, uid: int) -> bool:
        return uid in self._order

    def __len__(self) -> int:
        return len(self._order)

    def hit(self, uid: int) -> None:
        self._order.move_to_end(uid)

    def admit(self, uid: int) -> list[int]:
        evicted = []
        while len(self._order) >= self.capacity:
            evicted.append(self._order.popitem(last=False)[0])
        self._order[uid] = None
        return evicted


class S3FIFOPolicy:
    """S3-FIFO over ``capacity`` slots (see the module docstring); ``small_fraction`` of them for S."""

    def __init__(self, capacity: int, small_fraction: float = 0.1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 slot, got {capacity}")
        self.capacity = capacity
        self.small_capacity = max(1, int(capacity * small_fraction))
        self._small: deque[int] = deque()  # newest at the right
        self._main: deque[int] = deque()
        self._ghost: OrderedDict[int, None] = OrderedDict()  # ids only, oldest first
        self._freq: dict[int, int] = {}  # resident users -> 0..3

    def __contains__(self, uid: int) -> bool:
        return uid in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def hit(self, uid: int) -> None:
        f = self._freq[uid]
        if f < 3:
            self._freq[uid] = f + 1

    def admit(self, uid: int) -> list[int]:
        evicted: list[int] = []
        while len(self._freq) >= self.capacity:
            self._evict(evicted)
        self._freq[uid] = 0
        if uid in self._ghost:
            del self._ghost[uid]
            self._main.append(uid)
        else:
            self._small.append(uid)
        return evicted

    def _evict(self, evicted: list[int]) -> None:
        """Free one slot: from S while S holds at least its share (or M is empty), else from M."""
        if self._small and (len(self._small) >= self.small_capacity or not self._main):
            uid = self._small.popleft()
            if self._freq[uid] >= 1:  # hit while in S: promote to M
                self._freq[uid] = 0
                self._main.append(uid)
                return
            del self._freq[uid]
            evicted.append(uid)
            self._remember(uid)
            return
        while True:  # M: reinsert users with freq > 0 (decremented), evict the first with freq 0
            uid = self._main.popleft()
            f = self._freq[uid]
            if f > 0:
                self._freq[uid] = f - 1
                self._main.append(uid)
                continue
            del self._freq[uid]
            evicted.append(uid)
            return

    def _remember(self, uid: int) -> None:
        self._ghost[uid] = None
        while len(self._ghost) > max(1, self.capacity - self.small_capacity):
            self._ghost.popitem(last=False)


POLICIES: dict[str, type] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str, capacity: int) -> Policy:
    """The policy ``name`` ("lru" | "s3fifo") over ``capacity`` slots."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](capacity)
