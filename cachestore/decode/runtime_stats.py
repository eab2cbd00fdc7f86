"""What the decode runtime returns and counts: :class:`ScoreResult` (a request's logits and cold-start flags)
and :class:`RuntimeStats` (totals over every batch a runtime scored)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np


@dataclass
class RuntimeStats:
    """Totals over every batch a runtime scored (milliseconds are sums over batches)."""

    batches: int = 0
    users: int = 0
    cold_start_users: int = 0
    candidates: int = 0
    h2d_bytes: int = 0
    fetch_ms: float = 0.0
    h2d_ms: float = 0.0  # the batch copies' device time; 0 for resident steps (their graph is not timed)
    decode_ms: float = 0.0
    total_ms: float = 0.0
    tier_hits: int = 0  # present users found in the resident tier (cachestore/tier)
    tier_misses: int = 0  # present users fetched from LMDB (not resident)
    tier_evictions: int = 0  # entries evicted from the tier to admit others
    tier_admission_errors: int = 0  # entries refused on admission (CRC or header check failed)

    def as_dict(self) -> dict:
        return asdict(self)


STAT_FIELDS = tuple(f.name for f in fields(RuntimeStats))


@dataclass
class ScoreResult:
    """logits (B, C) float32 numpy (NaN where ``candidates`` was padding), cold_start (B,) bool (the user has
    no entry in the store: scored with an empty history), model_version: the checkpoint that scored them
    (records and model always come from one store version)."""

    logits: np.ndarray
    cold_start: np.ndarray
    stats: RuntimeStats = field(default_factory=RuntimeStats)
    model_version: str = ""

    @property
    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))


def candidate_mask(shape: tuple[int, int], n_candidates: object) -> np.ndarray:
    """(B, C) bool: the real candidates of a request of B users × C candidate slots — the first
    ``n_candidates[b]`` of row b (None: all). ValueError naming the field for counts of another length than B,
    not integers, or outside 0..C (their logits are NaN in :class:`ScoreResult`)."""
    b, c = shape
    if n_candidates is None:
        return np.ones(shape, dtype=bool)
    n = np.asarray(n_candidates)
    if n.ndim != 1 or len(n) != b or n.dtype.kind not in "iu":
        raise ValueError(f"n_candidates: {b} integer counts expected (one per user), got shape {n.shape} {n.dtype}")
    bad = np.flatnonzero((n < 0) | (n > c))
    if len(bad):
        raise ValueError(f"n_candidates[{bad[0]}]: {n[bad[0]]} is not a count of 0..{c} candidates")
    return np.arange(c)[None, :] < n.astype(np.int64)[:, None]
