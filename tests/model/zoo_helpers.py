"""Helpers shared by the model-zoo tests (and the store / serving tests that build zoo models): the tiny zoo
config, the K/V sharing variants, a seeded model and a padded batch, and the paper's K/V equations."""

from __future__ import annotations

import dataclasses

import torch

from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.zoo import create_model
from tests.helpers import padded_batch

N_ITEMS = 40
N_GENRES = 6


def zoo_config(arch: str, **kw: object) -> ModelConfig:
    base = ModelConfig(
        n_items=N_ITEMS, n_genres=N_GENRES, max_genres=3, embed_dim=16, d_attn=32, n_heads=4, max_len=4,
        mlp_dims=(16,), collective=CollectiveConfig(d_user=2, pool_size=12), arch=arch, long_len=10, topk=3,
        hash_bits=8, sdim_hashes=3, sdim_bits=2,
    )  # fmt: skip
    if arch == "hstu":
        base = dataclasses.replace(base, max_len=10)
    return dataclasses.replace(base, **kw)


VARIANTS = {
    "full": dict(kv_mode="full"),
    "collective": dict(kv_mode="collective"),
    "share_k": dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_v=False)),
    "share_v": dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_k=False)),
}


def make_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(0, cfg.n_genres + 1, (cfg.n_items + 1, cfg.max_genres), generator=g)
    genres[0] = 0
    torch.manual_seed(seed)
    m = create_model(cfg, genres).to(dtype)
    with torch.no_grad():  # non-zero relative biases so HSTU's positions matter in the tests
        for name, p in m.named_parameters():
            if name.endswith("rel_bias"):
                p.normal_(0, 0.5)
    return m


def make_batch(lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return padded_batch(torch.tensor(lengths, dtype=torch.long), width, g, N_ITEMS)


def valid_of(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


def paper_kv(branch: torch.nn.Module, x: torch.Tensor, silu_full: bool = False) -> torch.Tensor:
    """K or V of every row of x straight from the paper's equations (no dedup, no cache)."""
    if not branch.shared:
        y = branch.proj(x)
        return torch.nn.functional.silu(y) if silu_full else y
    return torch.cat([torch.nn.functional.silu(branch.proj(x)), branch.pool[branch.router(x).argmax(-1)]], -1)
