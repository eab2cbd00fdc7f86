"""Frozen configurations of the CTR models and their CollectiveKV variants.

One dataclass per component; derive variants with :func:`dataclasses.replace`, e.g.
``replace(cfg, kv_mode="full")`` or ``replace(cfg, collective=replace(cfg.collective, d_user=4))``.
Configs round-trip through plain JSON dicts (:func:`config_to_dict` / :func:`config_from_dict`),
which is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

KVMode = Literal["full", "collective"]


@dataclass(frozen=True)
class CollectiveConfig:
    """The CollectiveKV part of a model (ignored when ``kv_mode == "full"``).

    ``d_user`` counts against the whole attention dim ``d_attn`` (before the split into heads):
    a shared K has ``d_user`` user-specific dims and ``d_attn - d_user`` collective dims gathered
    from the global pool. A K (or V) that is not shared is a plain ``d_attn``-dim projection and
    is cached whole.
    """

    d_user: int = 1
    pool_size: int = 10_000
    share_k: bool = True
    share_v: bool = True
    peak_weight: float = 0.01
    balance_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.d_user < 1:
            raise ValueError(f"collective.d_user must be >= 1, got {self.d_user}")
        if self.pool_size < 1:
            raise ValueError(f"collective.pool_size must be >= 1, got {self.pool_size}")
        if self.peak_weight < 0 or self.balance_weight < 0:
            raise ValueError("collective loss weights must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """A DIN/SIM-style target-attention CTR model.

    Behaviour token = item embedding + mean genre embedding + feedback embedding (the event's
    label: 1 = negative, 2 = positive, 0 = padding). Target token = item + mean genre embedding.
    Attention: Q from the target, K/V from the last ``max_len`` behaviours, ``n_heads`` heads
    over ``d_attn`` dims; MLP over [attention output, target embedding].
    """

    n_items: int
    n_genres: int = 0
    max_genres: int = 1
    embed_dim: int = 64
    d_attn: int = 256
    n_heads: int = 8
    max_len: int = 50
    mlp_dims: tuple[int, ...] = (200, 80)
    dropout: float = 0.0
    kv_mode: KVMode = "collective"
    collective: CollectiveConfig = field(default_factory=CollectiveConfig)

    def __post_init__(self) -> None:
        if self.kv_mode not in ("full", "collective"):
            raise ValueError(f"kv_mode must be 'full' or 'collective', got {self.kv_mode!r}")
        if self.d_attn % self.n_heads:
            raise ValueError(f"d_attn {self.d_attn} is not divisible by n_heads {self.n_heads}")
        if not 1 <= self.max_len <= 4096:
            raise ValueError(f"max_len must be in [1, 4096], got {self.max_len}")
        if self.kv_mode == "collective" and self.collective.d_user >= self.d_attn:
            raise ValueError(f"collective.d_user {self.collective.d_user} must be < d_attn {self.d_attn}")
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")

    @property
    def k_shared(self) -> bool:
        return self.kv_mode == "collective" and self.collective.share_k

    @property
    def v_shared(self) -> bool:
        return self.kv_mode == "collective" and self.collective.share_v

    @property
    def dk_user(self) -> int:
        """Per-behaviour dims of the cached (user-specific) K."""
        return self.collective.d_user if self.k_shared else self.d_attn

    @property
    def dv_user(self) -> int:
        """Per-behaviour dims of the cached (user-specific) V."""
        return self.collective.d_user if self.v_shared else self.d_attn


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error."""
    d = dict(d)
    coll = CollectiveConfig(**d.pop("collective", {}))
    if "mlp_dims" in d:
        d["mlp_dims"] = tuple(d["mlp_dims"])
    return ModelConfig(collective=coll, **d)
