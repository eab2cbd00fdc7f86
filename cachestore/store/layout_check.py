"""Does a store fit a checkpoint? The checks a serving runtime makes before it serves a store version.

``check_layout(layout, model, model_version)``: a store (``EntryLayout``) must be exactly what
``cachestore.store.entry.entry_layout`` gives for the checkpoint (:func:`check_entry_layout`): same arch, parts,
index dtype, pool size and window. Another model version raises ``ModelVersionMismatchError``; shapes and
archs that do not fit raise ``LayoutError`` with a message that says what to load instead. No torch here
(a model is any object with ``cfg``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collectivekv.cachestore.store.entry import EntryLayout, entry_layout
from collectivekv.cachestore.store.record import LayoutError, ModelVersionMismatchError

if TYPE_CHECKING:
    import torch


def _check_version(layout: EntryLayout, model_version: str) -> None:
    if layout.model_version != model_version:
        raise ModelVersionMismatchError(
            f"the store was built by model version {layout.model_version}, but the loaded checkpoint is "
            f"model version {model_version}: load the checkpoint the store was prefilled with, or prefill "
            "and publish a store for this checkpoint")


def check_entry_layout(layout: EntryLayout, model: torch.nn.Module, model_version: str) -> None:
    """Refuse a store that was not prefilled with this model: other arch, other model
    version, or parts (names, kinds, widths, caps), index dtype, pool size or window that are not
    ``entry_layout(model.cfg, version, layout.mode, layout.kv_dtype)``'s."""
    cfg = model.cfg
    arch = getattr(cfg, "arch", "din")
    if layout.arch != arch:
        raise LayoutError(f"the store holds {layout.arch!r} caches, but the checkpoint is arch "
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


def check_layout(layout: EntryLayout, model: torch.nn.Module, model_version: str) -> None:
    """Refuse a store that was not prefilled with this model (version) or whose shapes differ:
    :func:`check_entry_layout` (a din store serves the din arch, ``TargetAttentionCTR``, only)."""
    check_entry_layout(layout, model, model_version)
