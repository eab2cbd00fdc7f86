"""The capacity model's cache format for any model of the zoo (SIM, ETA, SDIM, TWIN, HSTU; din too), read from
``model.cache_spec``: the full-KV and CollectiveKV entry layouts of one model config.

:class:`pipeline.reports.capacity.CacheFormat` describes din entries by their dimensions (the CLI's
``--d-attn/--d-user/--pool``); :class:`ZooFormat` takes a whole :class:`ModelConfig` — windows, groups,
retrieval keys — as a zoo store's manifest records it, so ``ckv capacity --store`` plans every model's store.
Both give ``layouts()``, ``pool_bytes()``, ``max_len``, ``d_attn`` and ``kv_dtype`` to
:func:`pipeline.reports.capacity.capacity_plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from collectivekv.cachestore.store.entry import EntryLayout, entry_layout
from collectivekv.cachestore.store.record import KV_DTYPES
from collectivekv.model.config import ModelConfig
from collectivekv.pipeline.reports.token_table import pool_bytes

_DUMMY_VERSION = "0" * 16


@dataclass(frozen=True)
class ZooFormat:
    """One model's full-KV and CollectiveKV entries (the model's own collective settings), K/V at ``kv_dtype``
    (the full-KV column at ``full_kv_dtype``, default the same)."""

    model: ModelConfig
    kv_dtype: str = "float16"
    full_kv_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in (self.kv_dtype, self.full_kv_dtype or self.kv_dtype):
            if name not in KV_DTYPES:
                raise ValueError(f"kv dtype must be one of {sorted(KV_DTYPES)}, got {name!r}")

    @property
    def d_attn(self) -> int:
        return self.model.d_attn

    @property
    def max_len(self) -> int:
        """Behaviours a user's entry holds at most (the model's longest cached window)."""
        return self.model.window_len

    def model_config(self) -> ModelConfig:
        return self.model

    def layouts(self) -> dict[str, EntryLayout]:
        """{"full": full-KV layout, "collective": CollectiveKV layout}, as the store writes them."""
        collective = dataclasses.replace(self.model, kv_mode="collective")
        return {mode: entry_layout(collective, _DUMMY_VERSION, mode, kv_dtype)
                for mode, kv_dtype in (("full", self.full_kv_dtype or self.kv_dtype), ("collective", self.kv_dtype))}

    def pool_bytes(self) -> int:
        """GPU-resident global pools at fp32 (every group's shared sides)."""
        return pool_bytes(dataclasses.replace(self.model, kv_mode="collective"))

    def collective_bytes_per_behaviour(self) -> float:
        """Mean payload bytes per behaviour of a full CollectiveKV window (the layout is model.cache_spec's)."""
        lay = self.layouts()["collective"]
        return (lay.record_size(self.max_len) - lay.record_size(0)) / self.max_len
