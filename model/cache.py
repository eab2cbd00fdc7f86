"""What the prefill stage caches per user, and how K/V are rebuilt from it.

A :class:`KVCache` holds a padded batch (valid behaviours first, then padding):

=========  ===============  ==========================================================
field      shape            meaning
=========  ===============  ==========================================================
k_user     (B, L, dk)       user-specific K part (dk = d_u when K is shared, else d_a)
v_user     (B, L, dv)       user-specific V part
k_idx      (B, L) int64     global K-pool indices (None when K is not shared)
v_idx      (B, L) int64     global V-pool indices (None when V is not shared)
lengths    (B,) int64       valid behaviours per user (0..L)
k_gate     (B, L) or None   soft-path scale sigmoid(top logit); training only, never stored
v_gate     (B, L) or None   likewise for V
=========  ===============  ==========================================================

Padding positions hold zeros in ``*_user`` and index 0 in ``*_idx``; attention masks them.
The full-KV baseline is the degenerate case: nothing shared, ``k_user``/``v_user`` are the whole
d_a-dim K and V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from collectivekv.model.routing import gather_pool


@dataclass(frozen=True)
class KVCache:
    k_user: torch.Tensor
    v_user: torch.Tensor
    k_idx: torch.Tensor | None
    v_idx: torch.Tensor | None
    lengths: torch.Tensor
    k_gate: torch.Tensor | None = None
    v_gate: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def to(self, device: torch.device | str) -> KVCache:
        """Copy every tensor to ``device``."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return KVCache(
            mv(self.k_user), mv(self.v_user), mv(self.k_idx), mv(self.v_idx),
            mv(self.lengths), mv(self.k_gate), mv(self.v_gate),
        )  # fmt: skip


def rebuild_kv(
    user: torch.Tensor,
    idx: torch.Tensor | None,
    pool: torch.Tensor | None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """K (or V) from its cached parts: ``concat(user, gate * pool[idx])`` along the feature axis.

    user: (B, L, d_u); idx: (B, L) or None (not shared: ``user`` already is the whole K);
    pool: (M, d_a - d_u). Returns (B, L, d_a).
    """
    if idx is None:
        return user
    if pool is None:
        raise ValueError("a shared K/V needs its global pool")
    collective = gather_pool(pool, idx, gate).to(user.dtype)  # (B, L, d_a - d_u)
    return torch.cat([user, collective], dim=-1)  # (B, L, d_a)
