"""HSTU (Zhai et al. 2024) for CTR, with a per-layer KV cache that is full or CollectiveKV.

Each layer (pointwise aggregated attention with SiLU gating, as in HSTU's sequential transduction
unit): ``h = LayerNorm(x)``; ``u, q = SiLU(W_uq h)``; K and V per position from
:class:`model.pool.KVBranch` — full: ``SiLU(W h)``; CollectiveKV: ``concat(SiLU(W_u h), pool[argmax
router(h)])`` (d_u + (d_a - d_u) dims); per head
``A_ij = SiLU(q_i·k_j/√d_h + rab[bucket(p_i - p_j)]) / max_len`` over the positions j a token may
see (causal); ``x ← x + W_o(LayerNorm(A V) ⊙ u)``. No softmax: masked positions contribute exactly 0.

Serving split (HSTU's "cached_forward"):

- :meth:`HSTU.prefill` runs the history (B, L) causally and **caches every layer's K and V of
  every history position**: ``ZooCache.kv["layer0"], kv["layer1"], …`` (each a
  :class:`model.cache.KVCache`: user part + pool index per position in the collective variant);
  nothing else is cached (the history's outputs are not needed later);
- :meth:`HSTU.decode` computes Q/K/V only for the candidates: each candidate sits at position
  ``lengths[b]`` and attends to the cached history and to itself (not to other candidates), so it
  equals the last position of a full causal forward pass over ``history + [candidate]``
  (:meth:`HSTU.sequence_forward`); an MLP scores ``[LayerNorm(output), candidate embedding]``;
- :meth:`HSTU.append` adds new behaviours to a cache (they attend causally to the cache and to
  each other), equal to prefilling the longer history.

The candidate token is its item + genre embedding (feedback unknown = the padding feedback id 0),
which is exactly the behaviour token of that item with feedback 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from collectivekv.model.attention import tail_window
from collectivekv.model.blocks import ZooBase, ZooCache, add_losses, trim
from collectivekv.model.cache import KVCache, rebuild_kv
from collectivekv.model.config import ModelConfig
from collectivekv.model.ctr import Head, RouterLosses, build_mlp, mlp_head
from collectivekv.model.pool import TokenBatch, kv_branches, prefill_pair

N_REL_BUCKETS = 32


def rel_bucket(d: torch.Tensor) -> torch.Tensor:
    """Relative distance (>= 0) → bucket: 0..7 exact, then 4 buckets per doubling, capped at 31."""
    big = 8 + (torch.log2(d.clamp(min=8).to(torch.float32) / 8) * 4).to(torch.int64)
    return torch.where(d < 8, d, big).clamp(0, N_REL_BUCKETS - 1)


def rows_as_tokens(h: torch.Tensor, valid: torch.Tensor) -> TokenBatch:
    """Every valid position of (B, M, E) as its own token (K/V depend on context: no dedup)."""
    x = h[valid]  # (N, E)
    n = x.shape[0]
    ar = torch.arange(n, device=h.device)
    return TokenBatch(valid=valid, x_unique=x, inverse=ar, counts=torch.ones_like(ar),
                      positions=valid.reshape(-1).nonzero().squeeze(1))  # fmt: skip


class HSTULayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, d_a = cfg.embed_dim, cfg.d_attn
        self.n_heads = cfg.n_heads
        self.norm_len = float(cfg.max_len)
        self.norm_in = nn.LayerNorm(e)
        self.uq = nn.Linear(e, 2 * d_a)
        self.k_branch, self.v_branch, self.kv_router = kv_branches(cfg)
        self.rel_bias = nn.Parameter(torch.zeros(cfg.n_heads, N_REL_BUCKETS))
        self.norm_out = nn.LayerNorm(d_a)
        self.out = nn.Linear(d_a, e)

    def project(
        self, x: torch.Tensor, valid: torch.Tensor, soft: bool
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache, RouterLosses]:
        """x (B, M, E) → u, q (B, M, d_a) and the cacheable K/V parts of the valid positions."""
        h = self.norm_in(x)
        u, q = nn.functional.silu(self.uq(h)).chunk(2, dim=-1)
        tokens = rows_as_tokens(h, valid)
        k, v = prefill_pair(self.k_branch, self.v_branch, tokens, soft)
        assert k is not None and self.k_branch is not None
        k_user = k.user if self.k_branch.shared else nn.functional.silu(k.user)
        v_user = v.user if self.v_branch.shared else nn.functional.silu(v.user)
        parts = KVCache(k_user=k_user, v_user=v_user, k_idx=k.idx, v_idx=v.idx, lengths=valid.sum(1),
                        k_gate=k.gate, v_gate=v.gate)  # fmt: skip
        return u, q, parts, RouterLosses(peak=k.peak + v.peak, balance=k.balance + v.balance)

    def keys_values(self, parts: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.k_branch is not None
        k = rebuild_kv(parts.k_user, parts.k_idx, self.k_branch.collective_pool(), parts.k_gate)
        v = rebuild_kv(parts.v_user, parts.v_idx, self.v_branch.collective_pool(), parts.v_gate)
        return k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Pointwise attention: q (B, M, d_a), k/v (B, N, d_a), positions q_pos (B, M), k_pos (B, N),
        allowed (B, M, N) bool → (B, M, d_a)."""
        b, m, d_a = q.shape
        n = k.shape[1]
        dh = d_a // self.n_heads
        qh = q.reshape(b, m, self.n_heads, dh)
        scores = torch.einsum("bmhd,bnhd->bhmn", qh, k.reshape(b, n, self.n_heads, dh)) / math.sqrt(dh)
        dist = (q_pos.unsqueeze(2) - k_pos.unsqueeze(1)).clamp(min=0)  # (B, M, N)
        # an embedding lookup, not rel_bias[:, buckets]: its backward reduces the B·M·N gradients into
        # the 32 buckets by sorting, where index_put's atomic adds all collide on 32 addresses (GPU)
        bias = nn.functional.embedding(rel_bucket(dist), self.rel_bias.t())  # (B, M, N, H)
        scores = scores + bias.permute(0, 3, 1, 2)  # (B, H, M, N)
        weights = nn.functional.silu(scores) * allowed.unsqueeze(1).to(scores.dtype) / self.norm_len
        out = torch.einsum("bhmn,bnhd->bmhd", weights, v.reshape(b, n, self.n_heads, dh))
        return out.reshape(b, m, d_a)

    def update(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.norm_out(attn) * u)


class HSTU(ZooBase):
    """HSTU CTR model: ``cfg.hstu_layers`` layers over the last ``cfg.max_len`` behaviours.

    Caches per user: every layer's K and V of every history position, ``kv["layer<i>"]``
    (collective: d_u-dim user parts + pool indices). See the module docstring.
    """

    def __init__(self, cfg: ModelConfig, item_genres: torch.Tensor | None = None) -> None:
        super().__init__(cfg, item_genres)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.hstu_layers))
        self.final_norm = nn.LayerNorm(cfg.embed_dim)
        self.mlp = build_mlp(2 * cfg.embed_dim, cfg.mlp_dims, cfg.dropout)

    # ---------------------------------------------------------------------------------- core
    def _extend(
        self, cache: ZooCache | None, x: torch.Tensor, new_len: torch.Tensor, candidates: bool, need_output: bool
    ) -> tuple[list[KVCache], torch.Tensor, RouterLosses]:
        """Run new tokens x (B, M, E) through every layer against a cache (or none).

        New token i of row b sits at position ``n_b + i`` (behaviours, causal among themselves) or
        at ``n_b`` (candidates: each sees only the cache and itself); ``new_len`` (B,) counts the
        valid new tokens. Returns each layer's K/V parts of the new tokens, the last layer's output
        (B, M, E) (only if ``need_output``; else the last layer's attention is skipped) and losses.
        """
        b, m, _ = x.shape
        dev = x.device
        n = cache.lengths if cache is not None else torch.zeros(b, dtype=torch.long, device=dev)
        ar_m = torch.arange(m, device=dev)
        new_valid = ar_m.unsqueeze(0) < new_len.unsqueeze(1)  # (B, M)
        q_pos = n.unsqueeze(1) + (torch.zeros_like(ar_m) if candidates else ar_m).unsqueeze(0)  # (B, M)
        pattern = torch.eye(m, dtype=torch.bool, device=dev) if candidates else torch.ones(
            m, m, dtype=torch.bool, device=dev).tril()  # fmt: skip
        allowed_new = pattern.unsqueeze(0) & new_valid.unsqueeze(1) & new_valid.unsqueeze(2)  # (B, M, M)
        soft = self.training
        parts_out: list[KVCache] = []
        losses: list[RouterLosses] = []
        for i, layer in enumerate(self.layers):
            u, q, parts, lo = layer.project(x, new_valid, soft)
            parts_out.append(parts)
            losses.append(lo)
            if i == len(self.layers) - 1 and not need_output:
                break
            k_new, v_new = layer.keys_values(parts)
            if cache is not None and cache.kv[f"layer{i}"].k_user.shape[1] > 0:
                k_c, v_c = layer.keys_values(cache.kv[f"layer{i}"])  # (B, Lc, d_a)
                lc = k_c.shape[1]
                ar_c = torch.arange(lc, device=dev)
                allowed_c = (ar_c.unsqueeze(0) < n.unsqueeze(1)).unsqueeze(1) & new_valid.unsqueeze(2)  # (B, M, Lc)
                k_all = torch.cat([k_c.to(q.dtype), k_new], 1)
                v_all = torch.cat([v_c.to(q.dtype), v_new], 1)
                k_pos = torch.cat([ar_c.unsqueeze(0).expand(b, lc), q_pos], 1)
                allowed = torch.cat([allowed_c, allowed_new], 2)
            else:
                k_all, v_all, k_pos, allowed = k_new, v_new, q_pos, allowed_new
            x = layer.update(x, layer.attend(q, k_all, v_all, q_pos, k_pos, allowed), u)
        return parts_out, x, add_losses(*losses)

    def _tokens(self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        tokens = self.behaviour_tokens(items, feedback, lengths)
        return tokens.spread(tokens.x_unique)  # (B, L, E), zeros at padding

    def _window(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_history(items, feedback, lengths)
        if items.shape[1] > self.cfg.max_len:
            items, feedback, lengths = tail_window(items, feedback, lengths, self.cfg.max_len)
        items, feedback = trim(items, feedback, lengths)
        return items, feedback, lengths

    # -------------------------------------------------------------------------- prefill/decode
    def prefill_with_losses(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[ZooCache, RouterLosses]:
        items, feedback, lengths = self._window(items, feedback, lengths)
        parts, _, losses = self._extend(None, self._tokens(items, feedback, lengths), lengths, False, False)
        kv = {f"layer{i}": KVCache(p.k_user, p.v_user, p.k_idx, p.v_idx, lengths, p.k_gate, p.v_gate)
              for i, p in enumerate(parts)}  # fmt: skip
        return ZooCache(lengths=lengths, kv=kv, keys={}), losses

    def decode_with_losses(self, cache: ZooCache, targets: torch.Tensor) -> tuple[torch.Tensor, RouterLosses]:
        squeeze = targets.dim() == 1
        tgt = targets.unsqueeze(1) if squeeze else targets  # (B, C)
        t = self.item_embedding(tgt)  # (B, C, E)
        full = torch.full((tgt.shape[0],), tgt.shape[1], dtype=torch.long, device=tgt.device)
        _, hidden, losses = self._extend(cache, t, full, True, True)
        logits = self.score_hidden(hidden, t)
        return (logits.squeeze(1) if squeeze else logits), losses

    def score_hidden(self, hidden: torch.Tensor, t: torch.Tensor,
                     head: Head = mlp_head) -> torch.Tensor:
        """Last-layer outputs (…, E) at candidate positions and the candidates' embeddings → logits (…) (``head``:
        the MLP's, as in ``TargetAttentionCTR.decode``)."""
        return head(self.mlp, [self.final_norm(hidden), t])

    def append(self, cache: ZooCache, items: torch.Tensor, feedback: torch.Tensor, new_len: torch.Tensor) -> ZooCache:
        """Cache of ``history + new behaviours`` from the history's cache: items/feedback (B, M) new
        behaviours (valid first), new_len (B,). The new positions are computed against the cache only.
        (No window: the result may exceed max_len; prefill the last max_len behaviours to re-window.)"""
        parts, _, _ = self._extend(cache, self._tokens(items, feedback, new_len), new_len, False, False)
        n, total = cache.lengths, cache.lengths + new_len
        width = max(1, int(total.max()))
        b, m = items.shape
        ar_m = torch.arange(m, device=items.device)
        valid = ar_m.unsqueeze(0) < new_len.unsqueeze(1)  # (B, M)
        rows = torch.arange(b, device=items.device).unsqueeze(1).expand(b, m)[valid]
        cols = (n.unsqueeze(1) + ar_m)[valid]

        def merge(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
            if old is None or new is None:
                return None
            out = old.new_zeros(b, width, *old.shape[2:])
            keep = min(old.shape[1], width)
            out[:, :keep] = old[:, :keep]
            out[rows, cols] = new[valid].to(out.dtype)
            return out

        kv = {}
        for i, p in enumerate(parts):
            c = cache.kv[f"layer{i}"]
            kv[f"layer{i}"] = KVCache(merge(c.k_user, p.k_user), merge(c.v_user, p.v_user), merge(c.k_idx, p.k_idx),
                                      merge(c.v_idx, p.v_idx), total, merge(c.k_gate, p.k_gate),
                                      merge(c.v_gate, p.v_gate))  # fmt: skip
        return ZooCache(lengths=total, kv=kv, keys={})

    def sequence_forward(
        self, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Full (uncached) causal pass over a whole sequence (no windowing): last-layer outputs
        (B, L, E) at every position and each layer's (K, V) (B, L, d_a)."""
        self._check_history(items, feedback, lengths)
        x = self._tokens(items, feedback, lengths)
        parts, hidden, _ = self._extend(None, x, lengths, False, True)
        return hidden, [layer.keys_values(p) for layer, p in zip(self.layers, parts, strict=True)]

    def keys_values(self, cache: ZooCache) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {f"layer{i}": layer.keys_values(cache.kv[f"layer{i}"]) for i, layer in enumerate(self.layers)}
