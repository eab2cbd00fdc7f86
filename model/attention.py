"""Multi-head target attention over a padded batch of behaviours — the plain reference math.

Layout used throughout the project: a batch of histories is padded to ``L`` positions with the
valid behaviours first (time order, oldest first) and padding after; ``lengths[b]`` counts the
valid ones (0 allowed: an empty history attends to nothing and yields a zero vector).
"""

from __future__ import annotations

import math

import torch


def tail_window(
    items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last ``min(lengths[b], n)`` behaviours of each padded row, valid first: (B, min(n, L)) items and
    feedback, (B,) lengths."""
    width = min(n, items.shape[1])
    new_len = lengths.clamp(max=n)  # (B,)
    start = lengths - new_len  # (B,)
    pos = torch.arange(width, device=items.device)  # (W,)
    gather = (start.unsqueeze(1) + pos).clamp(max=max(items.shape[1] - 1, 0))  # (B, W)
    keep = pos.unsqueeze(0) < new_len.unsqueeze(1)  # (B, W)
    zero = torch.zeros((), dtype=items.dtype, device=items.device)
    if items.shape[1] == 0:
        return items, feedback, new_len
    return (torch.where(keep, items.gather(1, gather), zero), torch.where(keep, feedback.gather(1, gather), zero),
            new_len)  # fmt: skip


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, L) bool, True at valid positions ``l < lengths[b]``."""
    positions = torch.arange(max_len, device=lengths.device)  # (L,)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)


def target_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, n_heads: int
) -> torch.Tensor:
    """Same result as :func:`target_attention_reference`, without head-split copies of K and V.

    Each query head is placed in its own d_a-block of a block-diagonal (B, C·H, d_a) matrix, so one
    batched matmul against the untouched (B, L, d_a) K gives every head's scores, and one against V
    gives (B, C·H, d_a) from which the diagonal head blocks are read. This costs H times the
    (tiny, C·H·L·d_a) FLOPs of the per-head products but never permutes the (B, L, d_a) K/V
    tensors, which dominate memory traffic for target attention (C << L).
    """
    b, c, d_a = q.shape
    dh = d_a // n_heads
    eye = torch.eye(n_heads, dtype=q.dtype, device=q.device)  # (H, H)
    qh = q.reshape(b, c, n_heads, 1, dh) * eye.reshape(1, 1, n_heads, n_heads, 1)  # (B, C, H, H, dh)
    qblock = qh.reshape(b, c * n_heads, d_a)  # (B, C·H, d_a) block-diagonal per candidate
    scores = torch.bmm(qblock, k.transpose(1, 2)) / math.sqrt(dh)  # (B, C·H, L)
    weights = masked_softmax(scores, lengths)  # (B, C·H, L)
    mixed = torch.bmm(weights, v).reshape(b, c, n_heads, n_heads, dh)  # (B, C, H, H, dh)
    out = torch.diagonal(mixed, dim1=2, dim2=3)  # (B, C, dh, H)
    return out.transpose(2, 3).reshape(b, c, d_a)  # (B, C, d_a)


def target_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, n_heads: int
) -> torch.Tensor:
    """Scaled dot-product attention of each target over its user's behaviours (plain math).

    Args:
        q: (B, C, d_a) queries, C candidates per user.
        k, v: (B, L, d_a) keys and values; positions >= lengths[b] are ignored.
        lengths: (B,) int number of valid behaviours.
        n_heads: heads; d_a is split into ``n_heads`` contiguous chunks of d_a / n_heads.

    Returns:
        (B, C, d_a) attention outputs (heads concatenated); all-zero where lengths[b] == 0.
    """
    b, c, d_a = q.shape
    seq = k.shape[1]
    dh = d_a // n_heads
    qh = q.reshape(b, c, n_heads, dh)  # (B, C, H, dh)
    kh = k.reshape(b, seq, n_heads, dh)  # (B, L, H, dh)
    vh = v.reshape(b, seq, n_heads, dh)  # (B, L, H, dh)
    scores = torch.einsum("bchd,blhd->bchl", qh, kh) / math.sqrt(dh)  # (B, C, H, L)
    weights = masked_softmax(scores, lengths)  # (B, C, H, L)
    out = torch.einsum("bchl,blhd->bchd", weights, vh)  # (B, C, H, dh)
    return out.reshape(b, c, d_a)  # (B, C, d_a)


def masked_softmax(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis (L) restricted to valid positions.

    scores: (B, ..., L); lengths: (B,). Masked positions get weight exactly 0; a row with no
    valid position gets all-zero weights (not NaN), and gradients stay finite.
    """
    mask = valid_mask(lengths, scores.shape[-1])  # (B, L)
    mask = mask.reshape(mask.shape[0], *([1] * (scores.dim() - 2)), mask.shape[1])  # (B, 1.., L)
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask
