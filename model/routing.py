"""CollectiveKV routing: router logits → global-pool indices, gates and the two router losses.

Pure tensor functions (the paper's math, Sec. 4.3):
- inference (hard): ``idx = argmax(logits)``; the collective row is ``pool[idx]``;
- training (soft): the same index, and the row is scaled by ``sigmoid(logits[idx])`` so that
  gradients reach the router;
- peak loss ``-log sigmoid(max logit)`` (mean over behaviours) pushes that gate to 1, making the
  soft path converge to the hard one;
- load-balance loss ``KL(mean softmax(logits) || uniform)`` spreads selections over the pool.

Losses accept per-row ``weights`` (counts) so that routing can run once per *distinct*
behaviour token and still equal the loss over every behaviour (see :class:`model.pool.GlobalPool`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    """Router decisions for N behaviours.

    idx: (N,) int64 pool index (argmax of the logits).
    top_logit: (N,) the winning logit (gate = sigmoid(top_logit)).
    """

    idx: torch.Tensor
    top_logit: torch.Tensor

    @property
    def gate(self) -> torch.Tensor:
        """(N,) soft-path scale sigmoid(top logit)."""
        return torch.sigmoid(self.top_logit)


def route(logits: torch.Tensor) -> Routing:
    """(N, M) router logits → argmax index and winning logit per row."""
    top_logit, idx = logits.max(dim=-1)  # (N,), (N,)
    return Routing(idx=idx, top_logit=top_logit)


def gather_pool(pool: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Collective rows ``pool[idx]`` (hard) or ``gate * pool[idx]`` (soft).

    pool: (M, d_c); idx: (...) int; gate: same shape as idx or None. Returns (..., d_c).
    """
    # index_select, not pool[idx]: its backward is an index_add (no sort), several times faster on CPU
    rows = pool.index_select(0, idx.reshape(-1)).reshape(*idx.shape, pool.shape[1])  # (..., d_c)
    if gate is not None:
        rows = rows * gate.unsqueeze(-1)
    return rows


def peak_loss(top_logit: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``-log sigmoid(top_logit)`` over behaviours (optionally count-weighted).

    top_logit: (N,); weights: (N,) non-negative counts or None. Returns a scalar; 0 for N == 0.
    """
    per_row = -F.logsigmoid(top_logit)  # (N,)
    return _weighted_mean(per_row, weights)


def balance_loss(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(p_mean || uniform) = sum_m p_mean[m] * log(p_mean[m] * M)``.

    logits: (N, M); p_mean is the (count-weighted) mean of ``softmax(logits)`` over rows.
    Returns a scalar >= 0; exactly 0 for a uniform mean; 0 for N == 0.
    """
    n, m = logits.shape
    if n == 0:
        return logits.sum() * 0.0
    probs = torch.softmax(logits, dim=-1)  # (N, M)
    if weights is None:
        p_mean = probs.mean(dim=0)  # (M,)
    else:
        w = weights.to(probs.dtype)
        p_mean = (w.unsqueeze(1) * probs).sum(dim=0) / w.sum()  # (M,)
    return torch.sum(torch.special.xlogy(p_mean, p_mean) + p_mean * math.log(m))


def _weighted_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if x.numel() == 0:
        return x.sum() * 0.0
    if weights is None:
        return x.mean()
    w = weights.to(x.dtype)
    return (w * x).sum() / w.sum()


class _FusedRouter(torch.autograd.Function):
    """Router logits → (top logit, argmax, balance loss) holding a single (U, M) buffer.

    Same values and gradients as ``route(x @ w.T)`` + ``balance_loss(x @ w.T, counts)``
    (checked by tests against autograd of the plain reference), but the softmax is computed in
    place and the backward pass writes its (U, M) gradient into the same buffer, so training
    touches the big logits matrix ~4 times instead of ~15.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor):  # type: ignore[override]
        buf = x @ w.t()  # (U, M) logits
        top, idx = buf.max(dim=-1)  # (U,), (U,)
        buf.sub_(top.unsqueeze(1)).exp_()  # (U, M) unnormalised probabilities
        buf.div_(buf.sum(dim=-1, keepdim=True))  # (U, M) softmax
        wts = counts.to(buf.dtype) / counts.sum().clamp(min=1).to(buf.dtype)  # (U,)
        p_mean = wts @ buf  # (M,)
        m = buf.shape[1]
        balance = torch.sum(torch.special.xlogy(p_mean, p_mean) + p_mean * math.log(m))
        ctx.save_for_backward(x, w, idx, wts, p_mean)
        ctx.buf = buf
        ctx.mark_non_differentiable(idx)
        return top, idx, balance

    @staticmethod
    def backward(ctx, d_top: torch.Tensor, _d_idx: torch.Tensor, d_balance: torch.Tensor):  # type: ignore[override]
        x, w, idx, wts, p_mean = ctx.saved_tensors
        buf = ctx.buf  # (U, M) softmax P, overwritten with dLogits
        ctx.buf = None
        m = buf.shape[1]
        g = torch.log(p_mean.clamp(min=torch.finfo(p_mean.dtype).tiny) * m) + 1.0  # (M,) dKL/dp_mean
        inner = buf @ g  # (U,) <P_u, g>
        # dL_u = wts_u * d_bal * P_u ⊙ (g - <P_u, g>)
        buf.mul_((g.unsqueeze(0) - inner.unsqueeze(1)).mul_((wts * d_balance).unsqueeze(1)))
        rows = torch.arange(buf.shape[0], device=buf.device)
        buf[rows, idx] += d_top  # d top_logit / d logits is one-hot at the argmax
        dx = buf @ w if ctx.needs_input_grad[0] else None  # (U, E)
        dw = buf.t() @ x if ctx.needs_input_grad[1] else None  # (M, E)
        return dx, dw, None


def fused_route(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> tuple[Routing, torch.Tensor]:
    """Routing of ``x`` (U, E) by a bias-free router ``weight`` (M, E) and the count-weighted
    balance loss, in one memory-lean pass (see :class:`_FusedRouter`). Returns (Routing, balance)."""
    top, idx, balance = _FusedRouter.apply(x, weight, counts)
    return Routing(idx=idx, top_logit=top), balance
