"""Paired comparison of two models on the same test samples: GAUC difference with a bootstrap interval
over users (numpy only).

A run keeps its per-user GAUC parts (:class:`UserAUC`: user, n_u, AUC_u over the users with both
labels; GAUC = Σ n_u AUC_u / Σ n_u). For runs A and B trained on the same data,

    Δ = GAUC_A − GAUC_B = Σ_u n_u (AUC_u^A − AUC_u^B) / Σ_u n_u     (u: users both runs score)

and the 95% interval is the 2.5/97.5 percentiles of Δ over ``n_boot`` resamples of the users with
replacement (a fixed generator seed, so a report is reproducible). Pooled over seeds, each user's
difference is averaged over the seed pairs first and the same user resampling applies; that interval
covers the sampling of users, not the training seeds. The **two-level** interval covers both: each
resample draws the users with replacement (the same draw for every seed: the users are one sample,
scored by every run) and the S seed pairs with replacement, and takes the mean over the drawn seeds
of each one's weighted Δ over the drawn users. With S = 1 it equals the users-only interval; with few
seeds it is coarse (S = 3 seeds give at most 10 distinct seed multisets), so read it with the per-seed Δ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collectivekv.model.metrics import per_user_auc

N_BOOT = 1000
BOOT_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class UserAUC:
    """One run's per-user GAUC parts on a split: users (U,) ascending, samples n (U,), AUC (U,)."""

    users: np.ndarray
    n: np.ndarray
    auc: np.ndarray

    @classmethod
    def of(cls, users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> UserAUC:
        return cls(*per_user_auc(users, labels, probs))

    @property
    def gauc(self) -> float:
        return float((self.n * self.auc).sum() / self.n.sum()) if len(self.n) else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"users": self.users.tolist(), "n": self.n.tolist(), "auc": [round(float(a), 6) for a in self.auc]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UserAUC:
        return cls(np.asarray(d["users"], np.int64), np.asarray(d["n"], np.int64), np.asarray(d["auc"], np.float64))

    def save(self, path: str | Path, split: str = "test") -> None:
        """Write ``{"split", "users", "n", "auc"}`` (compact JSON, through a temp file)."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"split": split, **self.to_json()}, separators=(",", ":")) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> UserAUC | None:
        """The parts saved at ``path``; None when there is no file (a run recorded before they were kept)."""
        path = Path(path)
        return cls.from_json(json.loads(path.read_text())) if path.is_file() else None


class NoSharedUsers(ValueError):
    """The compared runs have no test user with both labels in common (e.g. a leave-one-out test split)."""


def paired_difference(pairs: Sequence[tuple[UserAUC, UserAUC]], n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                      level: float = LEVEL) -> dict[str, Any]:
    """Δ = A − B over ``pairs`` [(A, B), one per seed] with its bootstrap interval over users.

    Returns {"diff", "lo", "hi", "level", "users", "pairs", "resamples", "share_le_0", "two_level": {"lo", "hi",
    "share_le_0"}} (share_le_0: the fraction of resamples with Δ <= 0; two_level: the interval over seeds and
    users, module docstring). Users are those every run scores; their weight is their
    sample count (the same in every run of one data set)."""
    if not pairs:
        raise ValueError("no run pairs to compare")
    common = pairs[0][0].users
    for a, b in pairs:
        common = np.intersect1d(np.intersect1d(common, a.users), b.users)
    if len(common) == 0:
        raise NoSharedUsers("the runs share no user with both labels")
    diffs, weights = [], None
    for a, b in pairs:
        ia, ib = np.searchsorted(a.users, common), np.searchsorted(b.users, common)
        if not np.array_equal(a.n[ia], b.n[ib]) or (weights is not None and not np.array_equal(a.n[ia], weights)):
            raise ValueError("the compared runs scored different test samples (a user's sample count differs): "
                             "a paired difference needs the same test split")
        diffs.append(a.auc[ia] - b.auc[ib])
        weights = a.n[ia].astype(np.float64) if weights is None else weights
    d = np.mean(diffs, axis=0)  # (U,) per-user difference, averaged over the seed pairs
    assert weights is not None
    boot = bootstrap_weighted_mean(d, weights, n_boot, seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    two = bootstrap_seeds_and_users(np.stack(diffs), weights, n_boot, seed)
    lo2, hi2 = np.quantile(two, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float((weights * d).sum() / weights.sum()), "lo": float(lo), "hi": float(hi), "level": level,
            "users": int(len(common)), "pairs": len(pairs), "resamples": n_boot,
            "share_le_0": float(np.mean(boot <= 0)),
            "two_level": {"lo": float(lo2), "hi": float(hi2), "share_le_0": float(np.mean(two <= 0))}}


def bootstrap_weighted_mean(values: np.ndarray, weights: np.ndarray, n_boot: int, seed: int,
                            chunk: int = 100) -> np.ndarray:
    """(n_boot,) weighted means Σ w v / Σ w over resamples of the rows with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    wv = weights * values
    out = np.empty(n_boot)
    for lo in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - lo), n))
        out[lo : lo + idx.shape[0]] = wv[idx].sum(1) / weights[idx].sum(1)
    return out


def bootstrap_seeds_and_users(diffs: np.ndarray, weights: np.ndarray, n_boot: int, seed: int,
                              chunk: int = 100) -> np.ndarray:
    """(n_boot,) two-level resamples of Δ (module docstring) from per-seed user differences ``diffs`` (S, U) with
    user weights (U,): users drawn first (the draws of :func:`bootstrap_weighted_mean` with the same seed), then
    S seed pairs with replacement, Δ* = mean over the drawn seeds of Σ w d / Σ w over the drawn users."""
    rng = np.random.default_rng(seed)
    s, n = diffs.shape
    wd = weights[None, :] * diffs  # (S, U)
    out = np.empty(n_boot)
    for lo in range(0, n_boot, chunk):
        c = min(chunk, n_boot - lo)
        idx = rng.integers(0, n, size=(c, n))  # (c, U) users
        per_seed = wd[:, idx].sum(-1) / weights[idx].sum(-1)  # (S, c) each seed's Δ over the drawn users
        picks = rng.integers(0, s, size=(c, s)) if s > 1 else np.zeros((c, 1), np.int64)  # (c, S) seed pairs
        out[lo : lo + c] = per_seed[picks, np.arange(c)[:, None]].mean(-1)
    return out


def paired_report(a_runs: dict[int, UserAUC], b_runs: dict[int, UserAUC]) -> dict[str, Any] | None:
    """Per seed and pooled A − B over the seeds both sides have (None when they share none, or no test user):
    {"seeds", "per_seed": [{"seed", diff, lo, hi, ...}], "pooled": {...}}."""
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        return None
    try:
        per_seed = [{"seed": s, **paired_difference([(a_runs[s], b_runs[s])])} for s in seeds]
        pooled = paired_difference([(a_runs[s], b_runs[s]) for s in seeds])
    except NoSharedUsers:  # no user to pair (e.g. one test event per user): the report shows "—"
        return None
    return {"seeds": seeds, "per_seed": per_seed, "pooled": pooled}


def fmt_interval(p: dict[str, Any] | None, digits: int = 4, two_level: bool = False) -> str:
    """"+0.0043 [+0.0011, +0.0075]" (Δ and its interval over users; ``two_level``: over seeds and users), or "—"."""
    if not p or (two_level and "two_level" not in p):
        return "—"
    lo, hi = (p["two_level"]["lo"], p["two_level"]["hi"]) if two_level else (p["lo"], p["hi"])
    return f"{p['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
