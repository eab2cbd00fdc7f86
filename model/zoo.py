"""The model zoo: ``ModelConfig.arch`` → model class, and what each model's cache entry holds.

======  ================================  ==================================================================
arch    class                             cache per user (n = cached history behaviours)
======  ================================  ==================================================================
din     :class:`model.ctr.TargetAttentionCTR`  K/V of the last max_len behaviours (:class:`model.cache.KVCache`)
sim     :class:`model.longseq.SIM`        short K/V (last max_len) + long K/V (long_len) + category bitmasks
eta     :class:`model.longseq.ETA`        short K/V + long K/V + SimHash signatures (hash_bits)
sdim    :class:`model.longseq.SDIM`       short K/V + long V + bucket ids (sdim_hashes × sdim_bits)
twin    :class:`model.longseq.TWIN`       short K/V + long K/V
hstu    :class:`model.hstu.HSTU`          per-layer K/V of the last max_len behaviours
======  ================================  ==================================================================

Every model has ``prefill(items, feedback, lengths) -> cache``, ``decode(cache, targets) -> logits``,
``forward(...) = (decode(prefill(...)), router losses)``, ``keys_values(cache)`` and ``loss``.

:func:`cache_groups` lists an entry's K/V groups; what an entry holds and its size (bytes, CR) are
:mod:`model.cache_spec`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from collectivekv.model.config import LONG_ARCHS, ModelConfig
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.hstu import HSTU
from collectivekv.model.longseq import ETA, SDIM, SIM, TWIN

MODELS: dict[str, type[nn.Module]] = {
    "din": TargetAttentionCTR,
    "sim": SIM,
    "eta": ETA,
    "sdim": SDIM,
    "twin": TWIN,
    "hstu": HSTU,
}
PAPER_MODELS: tuple[str, ...] = ("sim", "eta", "sdim", "twin", "hstu")


def model_class(arch: str) -> type[nn.Module]:
    try:
        return MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(MODELS)}") from None


def create_model(cfg: ModelConfig, item_genres: torch.Tensor | None = None) -> nn.Module:
    """``model_class(cfg.arch)(cfg, item_genres)``."""
    return model_class(cfg.arch)(cfg, item_genres)


@dataclass(frozen=True)
class CacheGroup:
    """One K/V group of a cache entry: ``positions`` behaviours, K and/or V cached."""

    name: str
    positions: int
    has_k: bool = True
    has_v: bool = True


def cache_groups(cfg: ModelConfig, n: int | None = None) -> list[CacheGroup]:
    """K/V groups of one user's entry for a history of ``n`` behaviours (default: a full window)."""
    n = cfg.window_len if n is None else n
    if cfg.arch in LONG_ARCHS:
        n_long = min(n, cfg.long_len)
        return [CacheGroup("short", min(n_long, cfg.max_len)), CacheGroup("long", n_long, has_k=cfg.arch != "sdim")]
    if cfg.arch == "hstu":
        return [CacheGroup(f"layer{i}", min(n, cfg.max_len)) for i in range(cfg.hstu_layers)]
    return [CacheGroup("kv", min(n, cfg.max_len))]
