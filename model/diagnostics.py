"""What a CollectiveKV model's routers do with their global pools (no I/O; read by the trainer).

- :class:`RoutingProbe` — attached to every router of a model (each shared :class:`model.pool.KVBranch` with
  its own pool, each :class:`model.pool.JointRouter` of a joint K/V index), it sees the
  router logits of every hard-routed (eval-mode) prefill and accumulates, per pool and weighted by
  behaviour (each distinct token counts its occurrences): the argmax usage of each pool row, the
  entropy and the top probability of ``softmax(logits)`` (the routing distribution the balance loss
  acts on), and ``|1 − gate|`` with ``gate = sigmoid(top logit)``: training scales the chosen row by
  that gate, inference uses the row with gate 1, so this is the train/inference gap the peak loss
  closes.
- :class:`GradientCounter` — after each backward pass, which pool rows received a non-zero gradient
  (only the argmax rows of a batch do); counted per row over an epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from collectivekv.model.pool import JointRouter, KVBranch

CHUNK_ROWS = 8192  # logits rows per softmax pass (bounds the temporary memory)


def shared_branches(model: nn.Module) -> dict[str, KVBranch | JointRouter]:
    """Every module with a router and a pool of its own, by module name ("k_branch", "long.v_branch",
    "kv_router" for a joint K/V index, …)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, JointRouter) or (isinstance(m, KVBranch) and m.pool is not None)}  # fmt: skip


@dataclass
class PoolStats:
    """Count-weighted sums over the behaviours routed into one pool of ``rows`` rows."""

    rows: int
    usage: torch.Tensor = field(init=False)  # (rows,) behaviours whose argmax is the row
    weight: float = 0.0
    entropy: float = 0.0  # Σ w · H(softmax(logits)) in nats
    max_prob: float = 0.0  # Σ w · max softmax(logits)
    gate_gap: float = 0.0  # Σ w · (1 − sigmoid(top logit))

    def __post_init__(self) -> None:
        self.usage = torch.zeros(self.rows, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, logits: torch.Tensor, counts: torch.Tensor) -> None:
        """Router logits (U, rows) of U distinct tokens occurring ``counts`` (U,) times."""
        for lg, c in zip(logits.split(CHUNK_ROWS), counts.split(CHUNK_ROWS), strict=True):
            w = c.to(torch.float64)
            logp = torch.log_softmax(lg.float(), dim=-1)  # (u, rows)
            top, idx = lg.max(dim=-1)  # (u,)
            ent = -(logp.exp() * logp).sum(-1)  # (u,)
            self.usage.index_add_(0, idx.cpu(), w.cpu())
            self.weight += float(w.sum())
            self.entropy += float((w * ent.double()).sum())
            self.max_prob += float((w * logp.max(dim=-1).values.exp().double()).sum())
            self.gate_gap += float((w * (1 - torch.sigmoid(top.double()))).sum())

    def summary(self) -> dict[str, Any]:
        """Fractions and means (see :func:`usage_summary`); behaviour-weighted."""
        w = max(self.weight, 1e-12)
        return {
            "rows": self.rows,
            "behaviours": int(self.weight),
            **usage_summary(self.usage),
            "router_entropy": self.entropy / w,
            "router_entropy_norm": self.entropy / w / math.log(self.rows) if self.rows > 1 else 0.0,
            "router_max_prob": self.max_prob / w,
            "gate_gap": self.gate_gap / w,
        }


def usage_summary(usage: torch.Tensor) -> dict[str, float]:
    """Of per-row usage counts: rows_used (fraction of rows with usage > 0), top1pct_share (share of the
    usage held by the top 1% of rows, at least one row), usage_entropy_norm (entropy of the usage
    distribution ÷ log rows: 1 = uniform) and effective_rows (exp of that entropy)."""
    rows = usage.numel()
    total = float(usage.sum())
    if total <= 0:
        return {"rows_used": 0.0, "top1pct_share": 0.0, "usage_entropy_norm": 0.0, "effective_rows": 0.0}
    p = usage / total
    h = float(-(torch.special.xlogy(p, p)).sum())
    top = max(1, math.ceil(rows / 100))
    return {
        "rows_used": float((usage > 0).double().mean()),
        "top1pct_share": float(torch.topk(usage, top).values.sum()) / total,
        "usage_entropy_norm": h / math.log(rows) if rows > 1 else 0.0,
        "effective_rows": math.exp(h),
    }


def combine(pools: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The model-level figures of per-pool summaries: rows_used over all rows; the behaviour-weighted
    means of the routing figures; the usage figures' mean over pools."""
    if not pools:
        return {}
    rows = sum(p["rows"] for p in pools.values())
    beh = sum(p["behaviours"] for p in pools.values()) or 1
    out: dict[str, float] = {"rows_used": sum(p["rows_used"] * p["rows"] for p in pools.values()) / rows}
    for key in ("router_entropy", "router_entropy_norm", "router_max_prob", "gate_gap"):
        out[key] = sum(p[key] * p["behaviours"] for p in pools.values()) / beh
    for key in ("top1pct_share", "usage_entropy_norm"):
        out[key] = sum(p[key] for p in pools.values()) / len(pools)
    return out


class RoutingProbe:
    """Context manager: while open, every hard-routed prefill of ``model``'s shared branches is
    accumulated (call the model in eval mode); ``summary()`` gives per-pool and combined figures."""

    def __init__(self, model: nn.Module) -> None:
        self.branches = shared_branches(model)
        self.stats = {name: PoolStats(int(b.pool.shape[0])) for name, b in self.branches.items()}

    def __enter__(self) -> RoutingProbe:
        for name, b in self.branches.items():
            b.probe = self.stats[name].observe
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for b in self.branches.values():
            b.probe = None

    def summary(self) -> dict[str, Any]:
        pools = {name: s.summary() for name, s in self.stats.items()}
        return {**combine(pools), "pools": pools}


class GradientCounter:
    """Per pool row, the optimiser steps in which it received a non-zero gradient (call
    :meth:`after_backward` after each ``loss.backward()``; :meth:`take` reads and resets)."""

    def __init__(self, model: nn.Module) -> None:
        self.pools = {name: b.pool for name, b in shared_branches(model).items()}
        self.hits = {name: torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                     for name, p in self.pools.items()}
        self.steps = 0

    @torch.no_grad()
    def after_backward(self) -> None:
        for name, p in self.pools.items():
            if p.grad is not None:
                self.hits[name] += p.grad.ne(0).any(dim=1)
        self.steps += 1

    def take(self) -> dict[str, Any]:
        """{"steps", "grad_rows" (fraction of all pool rows with a gradient in >= 1 step), "pools": {name:
        {"grad_rows", "steps_per_row_mean" (over the rows with a gradient), "steps_per_row_max"}}}."""
        pools: dict[str, Any] = {}
        touched = total = 0
        for name, h in self.hits.items():
            got = h[h > 0].double()
            pools[name] = {"grad_rows": float(got.numel() / h.numel()),
                           "steps_per_row_mean": float(got.mean()) if got.numel() else 0.0,
                           "steps_per_row_max": int(h.max()) if h.numel() else 0}  # fmt: skip
            touched, total = touched + got.numel(), total + h.numel()
            h.zero_()
        out = {"steps": self.steps, "grad_rows": touched / total if total else 0.0, "pools": pools}
        self.steps = 0
        return out
