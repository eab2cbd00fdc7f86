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

:func:`cache_groups` lists an entry's K/V groups; :func:`entry_bytes` and :func:`compression_rate`
count them: CR = bytes of a user's entry (user parts at ``kv_itemsize`` bytes, router indices at
their integer width, retrieval keys packed to whole bytes) ÷ bytes of the same user's K/V in the
*full* model at fp32 (retrieval keys are not K/V, so they count in the numerator only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from model.cache import index_itemsize
from model.config import LONG_ARCHS, ModelConfig
from model.ctr import TargetAttentionCTR
from model.entry import entry_parts
from model.hstu import HSTU
from model.longseq import ETA, SDIM, SIM, TWIN

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


def key_bytes_per_behaviour(cfg: ModelConfig) -> int:
    """Retrieval-key bytes per long-window behaviour (bits packed to whole bytes)."""
    return sum(p.width for p in entry_parts(cfg) if p.kind == "key")


def entry_bytes(cfg: ModelConfig, n: int | None = None, kv_itemsize: int = 2) -> int:
    """Bytes of one user's cache entry (the payload of its store record, :mod:`model.entry`). Full
    model: K/V at fp32 (the baseline); collective: user parts at ``kv_itemsize`` bytes + router
    indices; plus retrieval keys (either mode)."""
    n = cfg.window_len if n is None else n
    size = {"kv": 4 if cfg.kv_mode == "full" else kv_itemsize, "idx": index_itemsize(cfg.collective.pool_size),
            "key": 1}
    return sum(p.rows(n) * p.width * size[p.kind] for p in entry_parts(cfg))


def full_kv_bytes(cfg: ModelConfig, n: int | None = None) -> int:
    """Bytes of the same user's K/V in the full model at fp32 (the CR denominator)."""
    return sum(g.positions * (int(g.has_k) + int(g.has_v)) * cfg.d_attn * 4
               for g in cache_groups(replace(cfg, kv_mode="full"), n))  # fmt: skip


def compression_rate(cfg: ModelConfig, n: int | None = None, kv_itemsize: int = 2) -> float:
    """CR of a user with ``n`` history behaviours (default: a full window). For ``din`` this equals
    :func:`model.cache.compression_rate`."""
    return entry_bytes(cfg, n, kv_itemsize) / max(1, full_kv_bytes(cfg, n))
