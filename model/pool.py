"""The K (or V) branch of a model: a user-specific projection, plus for CollectiveKV a router
and a learnable global pool.

Routing runs once per *distinct* behaviour token in the batch rather than once per behaviour:
the router input is a function of the token alone (item, feedback), so the logits, indices and
count-weighted losses are exactly those of the per-behaviour computation at a fraction of the
cost of the (N, pool_size) logits. ``tests/model/test_model.py`` checks this against the plain reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from collectivekv.model.routing import fused_route, peak_loss, route


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch of behaviours as its distinct tokens.

    valid: (B, L) bool; x_unique: (U, E) embedding of each distinct valid token; inverse: (N,)
    row of x_unique for each valid position, in ``valid.nonzero()`` order; counts: (U,)
    occurrences of each distinct token. Every per-behaviour quantity that is a function of the
    token alone (projections, router logits) is computed on the U rows and spread to (B, L).
    """

    valid: torch.Tensor
    x_unique: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    positions: torch.Tensor  # (N,) flat index b * L + l of each valid position

    def spread(self, per_token: torch.Tensor) -> torch.Tensor:
        """(U, ...) per-token values → (B, L, ...) per position, zeros at padding."""
        rows = torch.index_select(per_token, 0, self.inverse)  # (N, ...)
        out = rows.new_zeros(self.valid.numel(), *rows.shape[1:])  # (B·L, ...)
        out = out.index_copy(0, self.positions, rows)  # (B·L, ...)
        return out.reshape(*self.valid.shape, *rows.shape[1:])  # (B, L, ...)


@dataclass(frozen=True)
class BranchState:
    """One branch's prefill output: user part (B, L, d), pool index and gate (B, L) or None,
    and its router losses (scalars; zero when not shared)."""

    user: torch.Tensor
    idx: torch.Tensor | None
    gate: torch.Tensor | None
    peak: torch.Tensor
    balance: torch.Tensor


class KVBranch(nn.Module):
    """Computes the cacheable parts of K (or V).

    Not shared: ``user = W x`` with W: E → d_a (the full-KV baseline).
    Shared: ``user = SiLU(W x)`` with W: E → d_u (as in the authors' code), and
    ``idx = argmax(router(x))`` into ``pool`` of shape (pool_size, d_a - d_u).
    """

    def __init__(self, embed_dim: int, d_attn: int, shared: bool, d_user: int, pool_size: int) -> None:
        super().__init__()
        self.shared = shared
        self.proj = nn.Linear(embed_dim, d_user if shared else d_attn, bias=False)
        if shared:
            self.router = nn.Linear(embed_dim, pool_size, bias=False)
            self.pool = nn.Parameter(torch.randn(pool_size, d_attn - d_user))
        else:
            self.router = None
            self.pool = None

    def prefill(self, tokens: TokenBatch, soft: bool) -> BranchState:
        """User part, indices and (if ``soft``) gates for every position; padding → 0."""
        user_u = self.proj(tokens.x_unique)  # (U, d)
        zero = user_u.new_zeros(())
        if not self.shared:
            return BranchState(tokens.spread(user_u), None, None, zero, zero)
        user = tokens.spread(nn.functional.silu(user_u))  # (B, L, d_u)
        assert self.router is not None
        if not soft:
            routing = route(self.router(tokens.x_unique))  # logits (U, M)
            return BranchState(user, tokens.spread(routing.idx), None, zero, zero)
        routing, balance = fused_route(tokens.x_unique, self.router.weight, tokens.counts)
        idx = tokens.spread(routing.idx)  # (B, L)
        gate = tokens.spread(routing.gate)  # (B, L)
        peak = peak_loss(routing.top_logit, tokens.counts)
        return BranchState(user, idx, gate, peak, balance)
