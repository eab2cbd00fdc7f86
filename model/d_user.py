"""``--d-user auto``: pick the user-specific dimension d_u from a trained full model's K/V.

The paper leaves d_u to manual tuning (Sec. 6). CollectiveKV writes each K (or V) as a pool row
chosen per behaviour plus a d_u-dim continuous user part, so d_u should be what the pool cannot
carry *across users*. :func:`choose_d_user` measures exactly that on K/V rows of the full model:

1. split the rows by user into two halves (fit / held out) — the pool is shared across users, so
   what it captures must transfer to users it was not fitted on;
2. fit a codebook of ``min(pool_size, distinct fit rows)`` rows by k-means on the fit half (the best
   a pool of that size can do with hard top-1 routing);
3. on the held-out half, take the residual R = row − nearest code (what the pool misses);
4. d_u = the smallest d ≥ 1 whose top-d principal directions of R leave at most ``eps`` of the
   held-out rows' total (centred) energy unexplained, capped at ``d_max``.

A caller that needs a compression budget caps the result further (``pipeline/training/zoo_eval.py`` reports
both). Pure tensor code, deterministic for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DUserChoice:
    d_user: int  # the choice (after the d_max cap)
    d_spectral: int  # smallest d meeting eps, uncapped (d_attn if none)
    unexplained: list[float]  # fraction of held-out energy left after d = 0, 1, ..., d_max user dims
    codes: int  # codebook size used
    eps: float
    n_fit: int
    n_heldout: int


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 15,
           seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Weighted Lloyd k-means of x (N, d) into k codes; returns (k, d). Seeding: greedy k-means++ for
    k <= 1024, else k random rows (seeded generator). Empty clusters keep their previous centre."""
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    w = torch.ones(n, dtype=x.dtype, device=x.device) if weights is None else weights.to(x.dtype)
    if k <= 1024:  # greedy k-means++: of a few d²-sampled candidates, keep the one lowering the cost most
        trials = 2 + int(math.log(k + 1))
        picks = [int(torch.randint(n, (1,), generator=g))]
        d2 = ((x - x[picks[0]]) ** 2).sum(1)
        for _ in range(1, k):
            p = (d2 * w).cpu()
            if float(p.sum()) <= 0:
                picks.append(picks[-1])
                continue
            cand = torch.multinomial(p / p.sum(), trials, replacement=True, generator=g).to(x.device)
            d2c = torch.minimum(d2.unsqueeze(0), torch.cdist(x[cand], x) ** 2)  # (trials, N)
            best = int((d2c * w).sum(1).argmin())
            picks.append(int(cand[best]))
            d2 = d2c[best]
        centres = x[torch.tensor(picks, device=x.device)].clone()
    else:
        centres = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x * w.unsqueeze(1))
        mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, assign, w)
        filled = mass > 0
        centres[filled] = sums[filled] / mass[filled].unsqueeze(1)
    return centres


def nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean) for each row of x, in chunks."""
    c2 = (centres * centres).sum(1)  # (k,)
    out = []
    for lo in range(0, x.shape[0], chunk):
        xs = x[lo : lo + chunk]
        out.append((c2.unsqueeze(0) - 2 * xs @ centres.t()).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def choose_d_user(
    rows: torch.Tensor, users: torch.Tensor, pool_size: int, eps: float = 0.05, d_max: int | None = None,
    seed: int = 0, iters: int = 15,
) -> DUserChoice:  # fmt: skip
    """rows (N, d_a) K (or V) vectors of behaviours, users (N,) their user ids → the d_u choice."""
    x = rows.detach().to(torch.float64)
    d_a = x.shape[1]
    d_max = max(1, d_a // 4) if d_max is None else d_max
    uniq = torch.unique(users)
    g = torch.Generator().manual_seed(seed)
    fit_users = uniq[torch.randperm(len(uniq), generator=g)[: max(1, len(uniq) // 2)].to(uniq.device)]
    fit = torch.isin(users, fit_users)
    held = ~fit if (~fit).any() else fit  # a single user: fit and evaluate on the same rows
    x_fit, x_held = x[fit], x[held]
    distinct, counts = torch.unique(x_fit, dim=0, return_counts=True)
    k = min(pool_size, distinct.shape[0])
    centres = kmeans(distinct, k, counts, iters=iters, seed=seed)
    resid = x_held - centres[nearest(x_held, centres)]  # (N_h, d_a)
    total = float(((x_held - x_held.mean(0)) ** 2).sum())
    sq = torch.linalg.svdvals(resid) ** 2  # (min(N_h, d_a),) descending
    left = float((resid**2).sum()) - torch.cat([sq.new_zeros(1), torch.cumsum(sq, 0)])  # after d = 0, 1, ...
    frac = (left.clamp(min=0) / max(total, 1e-300)).tolist()
    frac += [0.0] * max(0, d_max + 1 - len(frac))
    d_spec = next((d for d in range(1, len(frac)) if frac[d] <= eps), d_a)
    return DUserChoice(d_user=max(1, min(d_spec, d_max)), d_spectral=d_spec, unexplained=frac[: d_max + 1],
                       codes=k, eps=eps, n_fit=int(x_fit.shape[0]), n_heldout=int(x_held.shape[0]))  # fmt: skip
