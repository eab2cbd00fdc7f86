"""Does a store fit a checkpoint? The checks a serving runtime makes before it serves a store version.

``check_layout(layout, model, model_version)``: a v1 store (``CacheLayout``) holds din caches and serves the
``din`` arch (``TargetAttentionCTR``) only, with the store's shapes equal to the model config's; a v2 (zoo)
store (``EntryLayout``) must be exactly what ``cachestore.entry.entry_layout`` gives for the checkpoint
(:func:`check_entry_layout`). Both refuse another model version (``ModelVersionMismatchError``); shapes and
archs that do not fit raise ``LayoutError`` with a message that says what to load instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachestore.batch import is_entry_layout
from cachestore.entry import entry_layout
from cachestore.record import LayoutError, ModelVersionMismatchError
from model.ctr import TargetAttentionCTR

if TYPE_CHECKING:
    from cachestore.batch import StoreLayout
    from cachestore.entry import EntryLayout


def _check_version(layout: StoreLayout, model_version: str) -> None:
    if layout.model_version != model_version:
        raise ModelVersionMismatchError(
            f"the store was built by model version {layout.model_version}, but the loaded checkpoint is "
            f"model version {model_version}: load the checkpoint the store was prefilled with, or prefill "
            "and publish a store for this checkpoint")


def check_entry_layout(layout: EntryLayout, model: torch.nn.Module, model_version: str) -> None:
    """Refuse a v2 (zoo) store that was not prefilled with this model: other arch, other model
    version, or parts (names, kinds, widths, caps), index dtype, pool size or window that are not
    ``entry_layout(model.cfg, version, layout.mode, layout.kv_dtype)``'s."""
    cfg = model.cfg
    arch = getattr(cfg, "arch", "din")
    if layout.arch != arch:
        raise LayoutError(f"the store holds {layout.arch!r} caches (record format v2), but the checkpoint is arch "
                          f"{arch!r} ({type(model).__name__}): load the checkpoint the store was prefilled with")
    _check_version(layout, model_version)
    if layout.mode == "collective" and cfg.kv_mode != "collective":
        raise LayoutError("the store holds collective caches (user parts + router indices), but the checkpoint is "
                          "a full-KV model: load the collective checkpoint the store was prefilled with")
    want = entry_layout(cfg, model_version, layout.mode, layout.kv_dtype)
    if want.parts != layout.parts:
        have = {p.name: p for p in layout.parts}
        need = {p.name: p for p in want.parts}
        diffs = [f"missing {sorted(set(need) - set(have))}"] if set(need) - set(have) else []
        diffs += [f"unexpected {sorted(set(have) - set(need))}"] if set(have) - set(need) else []
        diffs += [f"{n}: store (kind, width, cap) = {(have[n].kind, have[n].width, have[n].cap)}, model needs "
                  f"{(need[n].kind, need[n].width, need[n].cap)}" for n in need if n in have and have[n] != need[n]]
        if not diffs:
            diffs = ["same parts in another order"]
        raise LayoutError(f"the store's parts do not fit the {arch} model for a {layout.mode} store: "
                          f"{'; '.join(diffs)}")
    for name in ("idx_dtype", "pool_size", "max_len"):
        got, exp = getattr(layout, name), getattr(want, name)
        if got != exp:
            raise LayoutError(f"store {name} {got!r} != {exp!r} expected for this {arch} model")


def check_layout(layout: StoreLayout, model: torch.nn.Module, model_version: str) -> None:
    """Refuse a store that was not prefilled with this model (version) or whose shapes differ.

    A v1 store (``CacheLayout``) holds din caches: only a ``din`` checkpoint (TargetAttentionCTR)
    serves it. A v2 store (``EntryLayout``): :func:`check_entry_layout`."""
    if is_entry_layout(layout):
        check_entry_layout(layout, model, model_version)  # type: ignore[arg-type]
        return
    arch = getattr(model.cfg, "arch", "din")
    if type(model) is not TargetAttentionCTR or arch != "din":
        raise LayoutError("this store (record format v1) holds din caches: it serves the din arch "
                          f"(TargetAttentionCTR) only; the checkpoint is arch {arch!r} ({type(model).__name__}), "
                          "whose cache has several K/V groups: serve it from a zoo store (record format v2) "
                          "prefilled with this checkpoint")
    _check_version(layout, model_version)
    cfg = model.cfg
    if layout.mode == "full":
        want = (cfg.d_attn, cfg.d_attn, False, False)
    else:
        want = (cfg.dk_user, cfg.dv_user, cfg.k_shared, cfg.v_shared)
        if (cfg.k_shared or cfg.v_shared) and layout.pool_size != cfg.collective.pool_size:
            raise LayoutError(f"store pool_size {layout.pool_size} != model pool_size {cfg.collective.pool_size}")
    got = (layout.dk, layout.dv, layout.k_shared, layout.v_shared)
    if got != want:
        raise LayoutError(f"store layout (dk, dv, k_shared, v_shared) = {got} does not fit the model: {want} "
                          f"expected for a {layout.mode} store")
