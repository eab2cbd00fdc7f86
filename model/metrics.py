"""CTR metrics: AUC (ties get half credit), GAUC and Logloss — numpy, no I/O.

- AUC = P(score of a random positive > score of a random negative) + 0.5 · P(tie), computed from
  average ranks (Mann–Whitney U), O(n log n).
- GAUC = Σ_u n_u · AUC_u / Σ_u n_u over users u that have both labels, n_u = the user's samples
  (the LongCTR / FuxiCTR definition).
- Logloss = mean binary cross-entropy of probabilities clipped to [eps, 1 - eps].

``per_user_auc`` gives GAUC's parts (users, n_u, AUC_u), from which paired comparisons between two
models on the same samples are built (:mod:`pipeline.training.paired`).
"""

from __future__ import annotations

import numpy as np

METRICS = ("gauc", "auc", "logloss")  # the keys of ctr_metrics, in report order


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(xs)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if np.isnan(s).any():  # NaN has no rank: an AUC over it would depend on the input order
        raise ValueError(f"{int(np.isnan(s).sum())} of {len(s)} scores are NaN (a diverged model?)")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Sample-count-weighted mean of per-user AUC over users with both labels (NaN if none)."""
    _, n, a = per_user_auc(users, labels, scores)
    return float((n * a).sum() / n.sum()) if n.size else float("nan")


def per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GAUC's parts: (user ids ascending (U,), samples n_u (U,), AUC_u (U,)) of the users with both labels;
    ``gauc == sum(n * auc) / sum(n)`` up to rounding."""
    u = np.asarray(users).ravel()
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not u.shape == y.shape == s.shape:
        raise ValueError(f"users {u.shape}, labels {y.shape} and scores {s.shape} differ in shape")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} of {len(s)} scores are NaN (a diverged model?)")
    order = np.argsort(u, kind="mergesort")
    u, y, s = u[order], y[order], s[order]
    cuts = np.flatnonzero(np.diff(u)) + 1
    firsts = u[np.concatenate([[0], cuts])] if len(u) else np.zeros(1, np.int64)
    keep_u, keep_n, keep_auc = [], [], []
    for uid, yy, ss in zip(firsts, np.split(y, cuts), np.split(s, cuts), strict=True):
        a = auc(yy, ss)
        if len(yy) and not np.isnan(a):
            keep_u.append(uid)
            keep_n.append(len(yy))
            keep_auc.append(a)
    return (np.asarray(keep_u, dtype=np.int64), np.asarray(keep_n, dtype=np.int64),
            np.asarray(keep_auc, dtype=np.float64))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (NaN over no samples)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    if not len(y):
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ctr_metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """{"gauc", "auc", "logloss"} of predicted click probabilities."""
    return {
        "gauc": gauc(users, labels, probs),
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
    }
