"""Building blocks shared by the model zoo (:mod:`model.longseq`, :mod:`model.hstu`).

- :class:`ZooBase` — the behaviour/item embeddings of :class:`model.ctr.TargetAttentionCTR` (same
  tables, same parameter names, and the same methods: they are borrowed, not copied), the
  prefill/decode split and the loss;
- :class:`ZooCache` — what a zoo model's prefill returns: named K/V groups (each a
  :class:`model.cache.KVCache`) plus retrieval keys;
- :class:`TABlock` — one multi-head target attention (Q projection + a K and a V
  :class:`model.pool.KVBranch`), full or CollectiveKV, with the three ways the zoo reads its cache:
  over all cached behaviours, over retrieved positions, or TWIN's per-head top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from collectivekv.model.attention import target_attention
from collectivekv.model.cache import KVCache, rebuild_kv
from collectivekv.model.config import ModelConfig
from collectivekv.model.ctr import BehaviourModel, RouterLosses
from collectivekv.model.pool import TokenBatch, kv_branches, prefill_pair
from collectivekv.model.retrieval import gather_positions, topk_target_attention


def add_losses(*parts: RouterLosses) -> RouterLosses:
    """Sum of router losses (peak with peak, balance with balance)."""
    peak = sum((p.peak for p in parts[1:]), parts[0].peak)
    balance = sum((p.balance for p in parts[1:]), parts[0].balance)
    return RouterLosses(peak=peak, balance=balance)


def trim(items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing all-padding columns (keeps at least one column)."""
    width = max(1, int(lengths.max())) if lengths.numel() else 1
    return items[:, :width], feedback[:, :width]


@dataclass(frozen=True)
class ZooCache:
    """A zoo model's per-user cache for a padded batch (see each model's docstring for its groups).

    lengths: (B,) valid behaviours cached per user; kv: named K/V groups, each a :class:`KVCache`
    (padded, valid first; a V-only group has a zero-width ``k_user`` and no ``k_idx``); keys: named
    per-behaviour retrieval keys, (B, L) or (B, L, m) int64, 0 at padding.
    """

    lengths: torch.Tensor
    kv: dict[str, KVCache]
    keys: dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def to(self, device: torch.device | str) -> ZooCache:
        return ZooCache(self.lengths.to(device), {n: c.to(device) for n, c in self.kv.items()},
                        {n: k.to(device) for n, k in self.keys.items()})  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by a flat name ("<group>.k_user", "keys.<name>", "lengths"); soft gates
        (training only) are never part of a cache entry."""
        out = {"lengths": self.lengths}
        for name, c in self.kv.items():
            for f in fields(c):
                t = getattr(c, f.name)
                if t is not None and f.name not in ("k_gate", "v_gate", "lengths"):
                    out[f"{name}.{f.name}"] = t
        out.update({f"keys.{n}": k for n, k in self.keys.items()})
        return out


class ZooBase(BehaviourModel):
    """Embeddings, prefill/decode split and loss shared by every zoo model.

    Behaviour token = item + mean genre + feedback embedding; target token = item + mean genre
    embedding — the tables and methods of :class:`model.ctr.BehaviourModel`. Subclasses implement
    :meth:`prefill_with_losses` and :meth:`decode_with_losses`; :meth:`forward` is
    ``decode(prefill(history), targets)``.
    """

    def prefill_with_losses(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[ZooCache, RouterLosses]:
        raise NotImplementedError

    def decode_with_losses(self, cache: ZooCache, targets: torch.Tensor) -> tuple[torch.Tensor, RouterLosses]:
        raise NotImplementedError

    def prefill(self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor) -> ZooCache:
        """History (B, L) → the per-user cache (hard routing in eval mode)."""
        return self.prefill_with_losses(items, feedback, lengths)[0]

    def decode(self, cache: ZooCache, targets: torch.Tensor) -> torch.Tensor:
        """Score candidates against a cache. targets (B,) or (B, C) → logits of the same shape."""
        return self.decode_with_losses(cache, targets)[0]

    def forward(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, RouterLosses]:
        """``decode(prefill(history), targets)``, plus the router losses for training."""
        cache, losses = self.prefill_with_losses(items, feedback, lengths)
        logits, more = self.decode_with_losses(cache, targets)
        return logits, add_losses(losses, more)

    def keys_values(self, cache: ZooCache) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every K/V group rebuilt from its cached parts: name → ((B, L, d_a) K, (B, L, d_a) V)."""
        raise NotImplementedError

    def zero_losses(self, like: torch.Tensor) -> RouterLosses:
        z = like.new_zeros(())
        return RouterLosses(peak=z, balance=z)


class TABlock(nn.Module):
    """One multi-head target attention: Q = W_q t; K and V from :class:`KVBranch` (full projection,
    or CollectiveKV user part + pool index), so its cache is a :class:`KVCache`.

    ``has_k=False`` makes a V-only block (SDIM's long stage caches values only); ``blocks``: its pools' index
    blocks (:func:`model.pool.block_table`); ``v_user``: its V's user dims, if not ``d_user``.
    """

    def __init__(self, cfg: ModelConfig, has_k: bool = True, blocks: int = 1, v_user: int | None = None) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.embed_dim, cfg.d_attn, bias=False) if has_k else None
        self.k_branch, self.v_branch, self.kv_router = kv_branches(cfg, has_k, blocks, v_user)

    def prefill(self, tokens: TokenBatch, lengths: torch.Tensor, soft: bool) -> tuple[KVCache, RouterLosses]:
        k, v = prefill_pair(self.k_branch, self.v_branch, tokens, soft)
        if k is None:
            zero = v.user.new_zeros(())
            k_user, k_idx, k_gate, peak, balance = v.user[..., :0], None, None, zero, zero
        else:
            k_user, k_idx, k_gate, peak, balance = k.user, k.idx, k.gate, k.peak, k.balance
        cache = KVCache(k_user=k_user, v_user=v.user, k_idx=k_idx, v_idx=v.idx, lengths=lengths,
                        k_gate=k_gate, v_gate=v.gate)  # fmt: skip
        return cache, RouterLosses(peak=peak + v.peak, balance=balance + v.balance)

    def keys_values(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, L, d_a) K (zero-width for a V-only block) and V from cached parts."""
        k_pool = None if self.k_branch is None else self.k_branch.collective_pool()
        k = rebuild_kv(cache.k_user, cache.k_idx, k_pool, cache.k_gate)
        v = rebuild_kv(cache.v_user, cache.v_idx, self.v_branch.collective_pool(), cache.v_gate)
        return k, v

    def query(self, t: torch.Tensor) -> torch.Tensor:
        assert self.q_proj is not None
        return self.q_proj(t)

    def attend(self, t: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Target attention of t (B, C, E) over every cached behaviour → (B, C, d_a)."""
        q = self.query(t)
        k, v = self.keys_values(cache)
        return target_attention(q, k.to(q.dtype), v.to(q.dtype), cache.lengths, self.n_heads)

    def attend_at(self, t: torch.Tensor, cache: KVCache, idx: torch.Tensor, n_sel: torch.Tensor) -> torch.Tensor:
        """Target attention of each candidate over its retrieved behaviours only: t (B, C, E),
        idx (B, C, S) positions, n_sel (B, C) how many are real → (B, C, d_a). Only the selected
        rows are rebuilt from the cache."""
        b, c, _ = t.shape

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else gather_positions(x, idx).flatten(0, 1)  # (B·C, S, ...)

        sel = KVCache(k_user=pick(cache.k_user), v_user=pick(cache.v_user), k_idx=pick(cache.k_idx),
                      v_idx=pick(cache.v_idx), lengths=n_sel.reshape(-1), k_gate=pick(cache.k_gate),
                      v_gate=pick(cache.v_gate))  # fmt: skip
        q = self.query(t)
        q = q.reshape(b * c, 1, q.shape[-1])  # (B·C, 1, d_a)
        k, v = self.keys_values(sel)  # (B·C, S, d_a)
        out = target_attention(q, k.to(q.dtype), v.to(q.dtype), sel.lengths, self.n_heads)  # (B·C, 1, d_a)
        return out.reshape(b, c, out.shape[-1])

    def attend_topk(self, t: torch.Tensor, cache: KVCache, topk: int) -> torch.Tensor:
        """TWIN: per-head top-k target attention over every cached behaviour → (B, C, d_a)."""
        q = self.query(t)
        k, v = self.keys_values(cache)
        return topk_target_attention(q, k.to(q.dtype), v.to(q.dtype), cache.lengths, self.n_heads, topk)
