"""Target-attention CTR model (DIN/SIM family) with a full or a CollectiveKV KV cache.

The model is split along the serving boundary:

- :meth:`TargetAttentionCTR.prefill` — history → :class:`~model.cache.KVCache` (what a nightly
  job stores per user: user-specific K/V + router indices, or the full K/V);
- :meth:`TargetAttentionCTR.decode` — cache + candidate items → logits;
- :meth:`TargetAttentionCTR.forward` is literally ``decode(prefill(history), targets)``.

Inputs (padded, valid behaviours first; see :mod:`model.attention`):
    items (B, L) int64 dense item ids (0 = padding), feedback (B, L) int64 (0 pad, 1 neg, 2 pos),
    lengths (B,) int64, targets (B,) or (B, C) int64 candidate item ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from collectivekv.model.attention import tail_window, target_attention, valid_mask
from collectivekv.model.cache import KVCache, rebuild_kv
from collectivekv.model.config import ModelConfig
from collectivekv.model.pool import TokenBatch, kv_branches, prefill_pair

N_FEEDBACK = 3  # 0 padding, 1 negative, 2 positive: the feedback vocabulary without event features (cfg.n_feedback)


@dataclass(frozen=True)
class RouterLosses:
    """Router losses summed over the K and V branches (0 for the full model)."""

    peak: torch.Tensor
    balance: torch.Tensor


def distinct(values: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.unique(values, return_inverse=True, return_counts=True)`` for ints in [0, bound),
    by a presence table instead of a sort (O(N + bound), several times faster on CPU) while the table is small
    next to the values; a sort beyond (per-event features multiply the token vocabulary by the event codes)."""
    if values.numel():
        lo, hi = torch.aminmax(values)
        if bool((lo < 0) | (hi >= bound)):  # one host sync per call (prefill and training hot path)
            raise ValueError(f"token ids must lie in [0, {bound}); got [{int(lo)}, {int(hi)}]")
    if bound > max(1 << 22, 16 * values.numel()):
        return torch.unique(values, return_inverse=True, return_counts=True)
    counts_all = torch.bincount(values, minlength=bound)  # (bound,)
    present = counts_all > 0
    uniq = present.nonzero().squeeze(1)  # (U,) ascending
    rank = torch.cumsum(present, 0) - 1  # (bound,) row of each present value
    return uniq, rank[values], counts_all[uniq]


class BehaviourModel(nn.Module):
    """Embedding tables, behaviour tokens, input checks and the training loss shared by every
    model of the project (:class:`TargetAttentionCTR` and the zoo in :mod:`model.blocks`).

    Behaviour token = item embedding + mean genre embedding + feedback embedding; target token =
    item + mean genre embedding. ``item_genres``: (n_items + 1, max_genres) int64 dense genre ids,
    0-padded; row 0 is the padding item. Stored as a buffer so a checkpoint is self-contained.
    """

    def __init__(self, cfg: ModelConfig, item_genres: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.item_emb = nn.Embedding(cfg.n_items + 1, e, padding_idx=0)
        self.genre_emb = nn.Embedding(cfg.n_genres + 1, e, padding_idx=0)
        self.feedback_emb = nn.Embedding(cfg.n_feedback, e, padding_idx=0)
        if item_genres is None:
            item_genres = torch.zeros(cfg.n_items + 1, cfg.max_genres, dtype=torch.long)
        if item_genres.shape != (cfg.n_items + 1, cfg.max_genres):
            raise ValueError(
                f"item_genres has shape {tuple(item_genres.shape)}, expected {(cfg.n_items + 1, cfg.max_genres)}"
            )
        self.register_buffer("item_genres", item_genres.long())

    def item_embedding(self, items: torch.Tensor) -> torch.Tensor:
        """(...) item ids → (..., E): item embedding + mean of its genre embeddings (0 if none)."""
        flat = items.reshape(-1)  # (N,)
        genres = nn.functional.embedding_bag(
            self.item_genres[flat], self.genre_emb.weight, mode="mean", padding_idx=0
        )  # (N, E)
        return self.item_emb(items) + genres.reshape(*items.shape, self.cfg.embed_dim)  # (..., E)

    def behaviour_tokens(self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor) -> TokenBatch:
        """Embeddings of a padded history batch, computed once per distinct (item, feedback) token."""
        valid = valid_mask(lengths, items.shape[1])  # (B, L)
        nf = self.cfg.n_feedback
        fb = feedback[valid]  # (N,)
        known = (fb >= 0) & (fb < nf)  # an unknown feedback id would alias another item's token
        token = torch.where(known, items[valid] * nf + fb, -1)  # (N,)
        try:
            uniq, inverse, counts = distinct(token, (self.cfg.n_items + 1) * nf)
        except ValueError:
            if not bool(known.all()):
                raise ValueError(f"feedback ids must lie in [0, {nf}) (the label plus this model's per-event "
                                 f"features); got {int(fb[~known][0])}") from None
            raise
        x_unique = self.item_embedding(uniq // nf) + self.feedback_emb(uniq % nf)  # (U, E)
        positions = valid.reshape(-1).nonzero().squeeze(1)  # (N,) row-major, same order as items[valid]
        return TokenBatch(valid=valid, x_unique=x_unique, inverse=inverse, counts=counts, positions=positions,
                          items=uniq // nf)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, losses: RouterLosses) -> torch.Tensor:
        """BCE + peak_weight · peak + balance_weight · balance (router terms only if collective)."""
        bce = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        if self.cfg.kv_mode == "full":
            return bce
        c = self.cfg.collective
        return bce + c.peak_weight * losses.peak + c.balance_weight * losses.balance

    def _check_history(self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor) -> None:
        if items.dim() != 2 or items.shape != feedback.shape or lengths.shape != items.shape[:1]:
            raise ValueError(
                f"history shapes must be items (B, L), feedback (B, L), lengths (B,); got "
                f"{tuple(items.shape)}, {tuple(feedback.shape)}, {tuple(lengths.shape)}"
            )


def build_mlp(d_in: int, dims: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Linear-ReLU-Dropout per hidden dim, then Linear → 1: every model's scoring MLP."""
    sizes = [d_in, *dims]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(sizes[-1], 1))
    return nn.Sequential(*layers)


def mlp_head(mlp: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits (...,) of the scoring MLP ``mlp`` (:func:`build_mlp`) over the concatenation of ``parts`` (..., d_p):
    every model's last step."""
    return mlp(torch.cat(list(parts), dim=-1)).squeeze(-1)


Head = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]  # (mlp, parts) → logits: mlp_head or equivalent


class TargetAttentionCTR(BehaviourModel):
    def __init__(self, cfg: ModelConfig, item_genres: torch.Tensor | None = None) -> None:
        """See :class:`BehaviourModel` for ``item_genres``."""
        super().__init__(cfg, item_genres)
        e = cfg.embed_dim
        self.k_branch, self.v_branch, self.kv_router = kv_branches(cfg)
        self.q_proj = nn.Linear(e, cfg.d_attn, bias=False)
        self.mlp = build_mlp(cfg.d_attn + e, cfg.mlp_dims, cfg.dropout)

    # ----------------------------------------------------------------------- prefill / decode
    def prefill_with_losses(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[KVCache, RouterLosses]:
        """Prefill plus router losses over the last ``max_len`` behaviours. In training mode the cache carries soft
        gates."""
        self._check_history(items, feedback, lengths)
        if items.shape[1] > self.cfg.max_len:  # the window the store caches (the latest behaviours)
            items, feedback, lengths = tail_window(items, feedback, lengths, self.cfg.max_len)
        tokens = self.behaviour_tokens(items, feedback, lengths)
        soft = self.training
        k, v = prefill_pair(self.k_branch, self.v_branch, tokens, soft)
        assert k is not None
        cache = KVCache(
            k_user=k.user, v_user=v.user, k_idx=k.idx, v_idx=v.idx,
            lengths=lengths, k_gate=k.gate, v_gate=v.gate,
        )  # fmt: skip
        return cache, RouterLosses(peak=k.peak + v.peak, balance=k.balance + v.balance)

    def prefill(self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor) -> KVCache:
        """History → cacheable state (hard routing in eval mode)."""
        return self.prefill_with_losses(items, feedback, lengths)[0]

    def keys_values(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild (B, L, d_a) K and V from a cache (user part + gated pool rows)."""
        k = rebuild_kv(cache.k_user, cache.k_idx, self.k_branch.collective_pool(), cache.k_gate)
        v = rebuild_kv(cache.v_user, cache.v_idx, self.v_branch.collective_pool(), cache.v_gate)
        return k, v

    def attend(self, q: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Target attention (B, C, d_a) of queries q (B, C, d_a) over K/V rebuilt from the cache."""
        k, v = self.keys_values(cache)  # (B, L, d_a) each
        return target_attention(q, k.to(q.dtype), v.to(q.dtype), cache.lengths, self.cfg.n_heads)

    def candidate_side(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What decode computes from the candidate ids (...) alone: their embeddings (..., E) and attention
        queries (..., d_a) — a function of the item id, so a server may tabulate it per item."""
        t = self.item_embedding(targets)  # (..., E)
        return t, self.q_proj(t)

    def decode(
        self,
        cache: KVCache,
        targets: torch.Tensor,
        attention: Callable[[torch.Tensor, KVCache], torch.Tensor] | None = None,
        candidate_side: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        head: Head = mlp_head,
    ) -> torch.Tensor:
        """Score candidates against a cache. targets (B,) or (B, C) → logits of the same shape.

        ``attention(q, cache) -> (B, C, d_a)`` replaces :meth:`attend` (serving passes an
        equivalent that never materialises the collective K/V: ``cachestore/decode/decode.py``);
        ``candidate_side`` replaces :meth:`candidate_side` (serving looks its outputs up per item), ``head`` the
        MLP's :func:`mlp_head` (serving: ``cachestore/decode/fused_mlp.py``)."""
        squeeze = targets.dim() == 1
        tgt = targets.unsqueeze(1) if squeeze else targets  # (B, C)
        t, q = (candidate_side or self.candidate_side)(tgt)  # (B, C, E), (B, C, d_a)
        attn = (attention or self.attend)(q, cache)  # (B, C, d_a)
        logits = head(self.mlp, [attn, t])  # (B, C)
        return logits.squeeze(1) if squeeze else logits

    def forward(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, RouterLosses]:
        """``decode(prefill(history), targets)``, plus the router losses for training."""
        cache, losses = self.prefill_with_losses(items, feedback, lengths)
        return self.decode(cache, targets), losses
