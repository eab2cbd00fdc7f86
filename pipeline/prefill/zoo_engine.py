"""The prefill engine of the zoo archs (SIM, ETA, SDIM, TWIN, HSTU):
``model.prefill`` per sub-chunk of users → each user's record payload (see :class:`ZooEngine`).
The din engines are in :mod:`pipeline.prefill.prefill_engines`, which picks this one for the other archs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collectivekv.cachestore.decode.entry_batch import entry_payloads, storage_arrays
from collectivekv.cachestore.store.entry import EntryLayout, entry_layout
from collectivekv.model.cache_spec import store_config
from collectivekv.model.entry import entry_arrays, full_cache, user_scales
from collectivekv.model.pool import router_width

MAX_POSITIONS = 1 << 16  # padded positions per model.prefill call (the direct and the zoo engine)
# largest intermediate (router logits: positions x pool; HSTU attention: users x heads x width^2) per
# model.prefill call of the zoo engine, in cells (fp32: 64 MB on a CPU)
_ZOO_CELLS = {"cpu": 1 << 24, "cuda": 1 << 27}


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def checked_device(model: torch.nn.Module, layout: object, want: object) -> torch.device:
    """An engine's checks on its model: ``layout`` must be the one the model writes (``want``), the
    model in eval mode (hard routing). Returns the model's device."""
    if want != layout:
        raise ValueError(f"layout {layout} does not fit the model (expected {want})")
    if model.training:
        raise ValueError("prefill needs the model in eval mode (hard routing)")
    return device_of(model)


@dataclass(frozen=True)
class FlatEntries:
    """One chunk's entries: every user's record payload (its parts in layout order, each
    ``min(n, cap)`` rows) back to back. values: uint8; offsets: (B + 1,) int64 into values."""

    values: np.ndarray
    offsets: np.ndarray


def _empty_entries(n_users: int) -> FlatEntries:
    return FlatEntries(np.zeros(0, np.uint8), np.zeros(n_users + 1, np.int64))


def _concat_entries(parts: list[FlatEntries]) -> FlatEntries:
    if len(parts) == 1:
        return parts[0]
    offsets, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return FlatEntries(np.concatenate([p.values for p in parts]), np.concatenate(offsets))


class ZooEngine:
    """The zoo archs (SIM, ETA, SDIM, TWIN, HSTU): ``model.prefill`` on the
    padded window of sub-chunks of users (input order, trimmed to the sub-chunk's longest history),
    then :func:`model.entry.entry_arrays` (mode full: :func:`model.entry.full_cache` first, every
    group's K/V rebuilt at d_a), storage dtypes and one payload per user
    (:func:`cachestore.decode.entry_batch.entry_payloads`). A sub-chunk holds at most 65,536 padded
    positions and keeps its largest intermediate (router logits positions x pool; HSTU's attention
    users x heads x width^2) under ``_ZOO_CELLS``; at least one user. Like ``direct``, the bits
    can depend on the sub-chunk's composition (matmul shapes); the same input and partitioning give
    the same bits."""

    name = "zoo"

    def __init__(self, model: torch.nn.Module, layout: EntryLayout) -> None:
        cfg = model.cfg
        self.device = checked_device(model, layout, entry_layout(cfg, layout.model_version, layout.mode,
                                                                 layout.kv_dtype))
        self.model = model
        self.layout = layout
        self.store_cfg = store_config(cfg, layout.mode)
        self.scales = user_scales(model, cfg)  # int8 user parts: the codes' scales (empty for float parts)
        cells = _ZOO_CELLS.get(self.device.type, _ZOO_CELLS["cpu"])
        self.max_positions = max(1, min(MAX_POSITIONS, cells // router_width(model)))  # router logits per chunk
        self.max_attention = cells // max(1, cfg.n_heads) if cfg.arch == "hstu" else None

    def _fits(self, users: int, width: int) -> bool:
        width = max(1, width)
        if users * width > self.max_positions:
            return False
        return self.max_attention is None or users * width * width <= self.max_attention

    def _prefill(self, items: np.ndarray, feedback: np.ndarray, lengths: np.ndarray) -> FlatEntries:
        if not lengths.any():
            return _empty_entries(len(lengths))
        dev = self.device
        with torch.inference_mode():
            cache = self.model.prefill(torch.from_numpy(items).to(dev), torch.from_numpy(feedback).to(dev),
                                       torch.from_numpy(lengths).to(dev))
            if self.layout.mode == "full":
                cache = full_cache(self.model, cache)
            arrays = storage_arrays(self.layout, entry_arrays(cache, self.store_cfg, self.scales))
        values, offsets = entry_payloads(self.layout, arrays, lengths)
        return FlatEntries(values, offsets)

    def run(self, items: np.ndarray, feedback: np.ndarray, lengths: np.ndarray) -> FlatEntries:
        parts, lo, b = [], 0, len(lengths)
        while lo < b:
            hi, longest = lo + 1, int(lengths[lo])
            while hi < b and self._fits(hi + 1 - lo, max(longest, int(lengths[hi]))):
                longest = max(longest, int(lengths[hi]))
                hi += 1
            width = max(1, longest)
            parts.append(self._prefill(items[lo:hi, :width], feedback[lo:hi, :width], lengths[lo:hi]))
            lo = hi
        return _concat_entries(parts) if parts else _empty_entries(0)
