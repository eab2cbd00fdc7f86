"""Helpers shared by the din serving tests and the server fixtures: the model version the stores are written with,
the history width and padded histories with lengths 0, 1 and the width among them."""

from __future__ import annotations

import torch

from tests.model.test_model import N_ITEMS

VERSION = "0123456789abcdef"
SEQ = 8  # small_config max_len


def histories(n_users: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded histories with lengths 0, 1 and L among them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, SEQ + 1, (n_users,), generator=g)
    lengths[:3] = torch.tensor([0, 1, SEQ])
    items = torch.randint(1, N_ITEMS + 1, (n_users, SEQ), generator=g)
    feedback = torch.randint(1, 3, (n_users, SEQ), generator=g)
    pad = torch.arange(SEQ).unsqueeze(0) >= lengths.unsqueeze(1)
    items[pad] = 0
    feedback[pad] = 0
    return items, feedback, lengths
