"""The paper's analysis of keys, values and the router (Sections 3.1–3.2, Appendices D–E), for any
checkpoint and histories. Pure functions over arrays / tensors (no I/O); plots are in
pipeline/reports/analysis_plots.py, the command in jobs/analysis.py (``ckv analyze``).

- **Figure 1** (cross-user similarity): per user the mean key (value) over its valid behaviours; cosine
  similarity of every pair of sampled users (:func:`cosine_matrix`, off-diagonal values), and — the
  paper's exact protocol — of one random reference user against all others.
- **Figure 2** (principal vs residual): per user ``K = U Σ Vᵀ`` (valid rows only); the principal part
  ``K V_k V_kᵀ`` (top-k right singular vectors), the residual ``K − K V_k V_kᵀ``; cross-user cosine
  similarity of their means, and the energy share of the top k (Σ_{i≤k} σ_i² / Σ σ_i²).
- **Figure 6** (router activations): histogram of the router's indices (bins of 50 pool rows) over all
  behaviours of 100 random users.
- **Figure 7** (similar users): the two sampled users whose history embeddings (mean behaviour token
  embedding, the router's input) have the highest cosine similarity (windows that are identical
  excluded); histograms of their indices (bins of 100) and the overlap of their activated index sets.
  The paper does not define its "overlap ratio"; we report the Jaccard ratio |A∩B| / |A∪B| and the
  overlap coefficient |A∩B| / min(|A|, |B|).
- **Pool utilisation** over all users: fraction of pool rows never chosen, entropy of the rows' usage
  normalised by log(pool size), perplexity exp(H) (the number of equally used rows with that entropy),
  share of behaviours taken by the most used 1% of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# ------------------------------------------------------------------------------------- pure math


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the first ``lengths[b]`` rows of each (L, d) slice: (B, L, d) → (B, d); NaN when 0."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, L)
    s = (x * valid[..., None]).sum(1)  # (B, d)
    n = lengths.to(x.dtype)[:, None]
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


def svd_split(x: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per user principal / residual parts of its (valid rows of) K: (B, L, d) → principal (B, L, d),
    residual (B, L, d), energy share of the top k singular values (B,) (NaN for an empty user).
    Padding rows are zeroed first, so they add only zero singular values."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    xm = (x * valid[..., None]).double()  # (B, L, d)
    # the SVD through the smaller Gram matrix (batched LAPACK SVD is very slow on CPU):
    # L <= d: K Kᵀ = U Σ² Uᵀ, principal = U_k U_kᵀ K;  else Kᵀ K = V Σ² Vᵀ, principal = K V_k V_kᵀ
    left = xm.shape[1] <= xm.shape[2]
    gram = xm @ xm.transpose(1, 2) if left else xm.transpose(1, 2) @ xm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batched small eigh: threads only contend (75x slower with 2 on 2 cores)
    try:
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    finally:
        torch.set_num_threads(threads)
    top = evecs[..., -k:]  # (B, L or d, k)
    principal = top @ (top.transpose(1, 2) @ xm) if left else (xm @ top) @ top.transpose(1, 2)
    residual = xm - principal
    evals = evals.clamp(min=0)
    e = evals.sum(-1)
    energy = torch.where(e > 0, evals[:, -k:].sum(-1) / e.clamp(min=1e-300), torch.full_like(e, float("nan")))
    return principal.to(x.dtype), residual.to(x.dtype), energy


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """(n, d) → (n, n) cosine similarities; rows that are zero or NaN give NaN."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norm) & (norm > 1e-12 * max(1.0, float(np.nanmax(norm, initial=0.0))))
    u = np.where(ok[:, None], x / np.where(ok, norm, 1.0)[:, None], np.nan)
    return np.clip(u @ u.T, -1.0, 1.0)


def offdiag(m: np.ndarray) -> np.ndarray:
    """The values above the diagonal (each unordered pair once), NaNs dropped."""
    iu = np.triu_indices(m.shape[0], k=1)
    v = m[iu]
    return v[np.isfinite(v)]


def reference_row(m: np.ndarray, ref: int) -> np.ndarray:
    """Similarities of user ``ref`` to every other user (the paper's protocol), NaNs dropped."""
    v = np.delete(m[ref], ref)
    return v[np.isfinite(v)]


def describe(values: np.ndarray) -> dict[str, Any]:
    """Summary statistics of a set of similarities."""
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"n": 0}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p05": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p95": float(q[4]),
            "max": float(v.max()), "frac_positive": float((v > 0).mean()),
            "frac_abs_lt_0.5": float((abs(v) < 0.5).mean())}


def kde(values: np.ndarray, grid: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density estimate of ``values`` on ``grid`` (Scott's bandwidth by default),
    computed on a fine binning of the values (exact enough for plots; O(len(grid)·bins))."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return np.zeros_like(grid, dtype=np.float64)
    bw = bandwidth or max(1.06 * float(v.std()) * len(v) ** (-1 / 5), 1e-3)
    lo, hi = min(v.min(), grid.min()) - 4 * bw, max(v.max(), grid.max()) + 4 * bw
    counts, edges = np.histogram(v, bins=2048, range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    z = (grid[:, None] - centres[None, :]) / bw
    return (np.exp(-0.5 * z**2) @ counts) / (len(v) * bw * math.sqrt(2 * math.pi))


def index_histogram(indices: np.ndarray, pool_size: int, bin_size: int) -> np.ndarray:
    """Counts of router indices in bins of ``bin_size`` pool rows: (ceil(pool / bin),)."""
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= pool_size):
        raise ValueError(f"indices must lie in [0, {pool_size})")
    return np.bincount(idx // bin_size, minlength=-(-pool_size // bin_size))


def overlap(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Overlap of two users' activated index sets: Jaccard |A∩B|/|A∪B| and |A∩B|/min(|A|,|B|)."""
    sa, sb = set(np.asarray(a).ravel().tolist()), set(np.asarray(b).ravel().tolist())
    inter, union = len(sa & sb), len(sa | sb)
    small = min(len(sa), len(sb))
    return {"a": len(sa), "b": len(sb), "intersection": inter, "union": union,
            "jaccard": inter / union if union else float("nan"),
            "overlap_coefficient": inter / small if small else float("nan")}


def utilisation(counts: np.ndarray) -> dict[str, Any]:
    """Pool utilisation from per-row usage counts (pool,): rows never chosen, normalised entropy, ..."""
    c = np.asarray(counts, dtype=np.float64)
    m, total = len(c), float(c.sum())
    if total == 0:
        return {"pool_size": m, "behaviours": 0, "never_chosen": m, "never_chosen_frac": 1.0}
    p = c[c > 0] / total
    h = float(-(p * np.log(p)).sum())
    top = np.sort(c)[::-1][: max(1, m // 100)]
    return {"pool_size": m, "behaviours": int(total), "used": int((c > 0).sum()), "never_chosen": int((c == 0).sum()),
            "never_chosen_frac": float((c == 0).mean()), "entropy_nats": h,
            "entropy_normalised": h / math.log(m) if m > 1 else 1.0, "perplexity": math.exp(h),
            "top1pct_share": float(top.sum() / total), "max_share": float(c.max() / total)}


def most_similar_pair(emb: np.ndarray, exclude_identical: np.ndarray | None = None) -> tuple[int, int, float]:
    """(i, j, cosine) of the most similar pair of rows (i < j); ``exclude_identical``: (n, n) bool of pairs
    to skip (e.g. identical histories). (-1, -1, nan) if there is no pair."""
    m = cosine_matrix(emb)
    iu = np.triu_indices(m.shape[0], k=1)
    v = m[iu].copy()
    if exclude_identical is not None:
        v[exclude_identical[iu]] = np.nan
    if not np.isfinite(v).any():
        return -1, -1, float("nan")
    best = int(np.nanargmax(v))
    return int(iu[0][best]), int(iu[1][best]), float(v[best])


# ------------------------------------------------------------------------------- model analysis
@dataclass
class Analysis:
    """JSON summary + the arrays the plots need."""

    summary: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _check_model(model: torch.nn.Module) -> None:
    from collectivekv.model.ctr import TargetAttentionCTR

    if not isinstance(model, TargetAttentionCTR):
        raise ValueError(f"the analysis reads one K/V group per behaviour (arch 'din'); this checkpoint's model is "
                         f"{type(model).__name__} (arch {getattr(getattr(model, 'cfg', None), 'arch', '?')!r})")


def history_embedding(model: torch.nn.Module, items: torch.Tensor, feedback: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
    """Mean behaviour token embedding (item + genres + feedback: the router's input) per user (B, E)."""
    x = model.item_embedding(items) + model.feedback_emb(feedback)
    return masked_mean(x, lengths)


@torch.no_grad()
def analyze_model(model: torch.nn.Module, items: np.ndarray, feedback: np.ndarray, lengths: np.ndarray, *,
                  n_sample: int = 1000, n_router_users: int = 100, k: int = 2, seed: int = 0, chunk: int = 256,
                  hist_bin: int = 50, pair_bin: int = 100) -> Analysis:
    """All the analyses for users given as padded windows (items, feedback, lengths: the model's
    input, e.g. ``pipeline.data.history`` windows). Users for Figures 1, 2, 7 are a seeded sample of
    ``n_sample``; Figure 6 uses the first ``n_router_users`` of that sample; utilisation uses all rows."""
    _check_model(model)
    model.eval()
    cfg = model.cfg
    n = len(lengths)
    rng = np.random.default_rng(seed)
    nonempty = np.flatnonzero(np.asarray(lengths) > 0)
    sample = np.sort(rng.choice(nonempty, size=min(n_sample, len(nonempty)), replace=False))
    shared = {"K": cfg.k_shared, "V": cfg.v_shared}
    it, fb, ln = (torch.as_tensor(np.asarray(a), dtype=torch.long) for a in (items, feedback, lengths))
    arr, idx_lists = _sample_arrays(model, (it, fb, ln), sample, k, chunk)
    ref = int(rng.integers(len(sample))) if len(sample) else 0
    out = Analysis()
    out.summary = {"users": int(n), "sampled_users": int(len(sample)), "seed": seed, "svd_k": k,
                   "reference_user_row": ref, "d_attn": cfg.d_attn, "kv_mode": cfg.kv_mode,
                   "pool_size": cfg.collective.pool_size if cfg.kv_mode == "collective" else None,
                   "fig1": {}, "fig2": {}}
    _similarity_figures(out, arr, ref, k)
    if not any(shared.values()):
        out.summary["router"] = None
        out.summary["router_note"] = "full-KV checkpoint: no router, no pool (Figures 6, 7 and utilisation skipped)"
        return out
    pool = cfg.collective.pool_size
    router: dict[str, Any] = {"hist_bin": hist_bin, "pair_bin": pair_bin, "router_users": min(n_router_users,
                                                                                              len(sample))}
    # Figure 6: the first n_router_users sampled users (a random subset)
    for name in ("K", "V"):
        if shared[name]:
            sel = idx_lists[name][:n_router_users]
            h = index_histogram(np.concatenate(sel) if sel else np.zeros(0), pool, hist_bin)
            out.arrays[f"fig6_{name}"] = h
            router[f"fig6_{name}"] = {"behaviours": int(h.sum()), "bins": len(h), "bins_empty": int((h == 0).sum()),
                                      "max_bin_share": float(h.max() / h.sum()) if h.sum() else None}
    router["fig7"] = _similar_users(out, arr["hist_emb"], idx_lists, np.asarray(items)[sample] * 3
                                    + np.asarray(feedback)[sample], sample, shared, pool, pair_bin)
    for name, c in _pool_usage(model, (it, fb, ln), shared, pool, chunk).items():
        out.arrays[f"usage_{name}"] = c
        router[f"utilisation_{name}"] = utilisation(c)
    out.summary["router"] = router
    return out


def _sample_arrays(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], sample: np.ndarray, k: int, chunk: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Per sampled user: the mean / principal / residual key and value, the top-k energy share and the history
    embedding (name → (n_sample, ...) array), and each user's router indices per pool ("K", "V")."""
    it, fb, ln = inputs
    acc: dict[str, list[np.ndarray]] = {}
    idx_lists: dict[str, list[np.ndarray]] = {"K": [], "V": []}
    for s in range(0, len(sample), chunk):
        rows = torch.as_tensor(sample[s:s + chunk])
        i_c, f_c, l_c = it[rows], fb[rows], ln[rows]
        width = max(1, int(l_c.max()))
        i_c, f_c = i_c[:, :width], f_c[:, :width]
        cache = model.prefill(i_c, f_c, l_c)
        kv = dict(zip(("K", "V"), model.keys_values(cache), strict=True))
        for name, x in kv.items():
            x = x.float()
            principal, residual, energy = svd_split(x, l_c, k)
            for key, val in ((f"mean_{name}", masked_mean(x, l_c)), (f"principal_{name}", masked_mean(principal, l_c)),
                             (f"residual_{name}", masked_mean(residual, l_c)), (f"energy_{name}", energy)):
                acc.setdefault(key, []).append(val.double().numpy())
        acc.setdefault("hist_emb", []).append(history_embedding(model, i_c, f_c, l_c).double().numpy())
        for name, idx in (("K", cache.k_idx), ("V", cache.v_idx)):
            if idx is not None:
                idx_lists[name] += [idx[b, : int(l_c[b])].numpy().copy() for b in range(len(rows))]
    return {key: np.concatenate(v) for key, v in acc.items()}, idx_lists


def _similarity_figures(out: Analysis, arr: dict[str, np.ndarray], ref: int, k: int) -> None:
    """Figures 1 and 2: cross-user cosine similarity of the mean, principal and residual keys and values
    (every pair and against the reference user), and the top-k energy share."""
    for name in ("K", "V"):
        for part, fig in (("mean", "fig1"), ("principal", "fig2"), ("residual", "fig2")):
            m = cosine_matrix(arr[f"{part}_{name}"])
            pairs, refrow = offdiag(m), reference_row(m, ref) if len(m) else np.zeros(0)
            out.arrays[f"{part}_{name}_pairs"] = pairs
            out.arrays[f"{part}_{name}_ref"] = refrow
            out.summary[fig][f"{part}_{name}"] = {"pairs": describe(pairs), "reference_user": describe(refrow)}
        e = arr[f"energy_{name}"]
        out.summary["fig2"][f"energy_top{k}_{name}"] = describe(e[np.isfinite(e)])


def _similar_users(out: Analysis, hist_emb: np.ndarray, idx_lists: dict[str, list[np.ndarray]], win: np.ndarray,
                   sample: np.ndarray, shared: dict[str, bool], pool: int, pair_bin: int) -> dict[str, Any]:
    """Figure 7: the most similar pair of history embeddings (identical windows ``win`` excluded), their
    index histograms and overlaps."""
    _, group = np.unique(win, axis=0, return_inverse=True)
    group = np.asarray(group).ravel()
    same = group[:, None] == group[None, :]  # identical windows
    i, j, sim = most_similar_pair(hist_emb, same)
    fig7: dict[str, Any] = {"user_rows": [int(sample[i]), int(sample[j])] if i >= 0 else None,
                            "history_cosine": sim, "above_0.8": bool(sim > 0.8) if i >= 0 else False}
    if i >= 0:
        for name in ("K", "V"):
            if shared[name]:
                a, b = idx_lists[name][i], idx_lists[name][j]
                out.arrays[f"fig7_{name}_a"] = index_histogram(a, pool, pair_bin)
                out.arrays[f"fig7_{name}_b"] = index_histogram(b, pool, pair_bin)
                fig7[f"overlap_{name}"] = overlap(a, b)
    return fig7


def _pool_usage(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], shared: dict[str, bool], pool: int,
                chunk: int) -> dict[str, np.ndarray]:
    """How often each pool row is chosen over all users' behaviours, per shared pool."""
    it, fb, ln = inputs
    counts = {name: np.zeros(pool, dtype=np.int64) for name in ("K", "V") if shared[name]}
    for s in range(0, len(ln), chunk):
        l_c = ln[s:s + chunk]
        width = max(1, int(l_c.max()))
        cache = model.prefill(it[s:s + chunk, :width], fb[s:s + chunk, :width], l_c)
        valid = torch.arange(width)[None, :] < l_c[:, None]
        for name, idx in (("K", cache.k_idx), ("V", cache.v_idx)):
            if idx is not None:
                counts[name] += np.bincount(idx[valid].numpy(), minlength=pool)
    return counts
