"""Helpers shared by the model tests (test_model.py, test_zoo.py)."""

from __future__ import annotations

import torch


def padded_batch(
    lengths: torch.Tensor, width: int, g: torch.Generator, n_items: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random padded history batch in the model's layout: items (B, width), feedback (B, width)
    (0 at padding), ``lengths`` (B,) and one target item per row, drawn from ``g`` in that order."""
    b = len(lengths)
    items = torch.randint(1, n_items + 1, (b, width), generator=g)  # (B, L)
    feedback = torch.randint(1, 3, (b, width), generator=g)  # (B, L)
    pad = torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, L)
    items[pad] = 0
    feedback[pad] = 0
    targets = torch.randint(1, n_items + 1, (b,), generator=g)  # (B,)
    return items, feedback, lengths, targets
