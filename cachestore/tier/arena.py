"""The resident tier's memory: records in one device buffer, and the batch built from it on the device.

Layout (all on the tier's device; CUDA, or host memory on CPU):

    arena    uint8 (arena_bytes,)  records verbatim (the LMDB value: 32-byte header + payload,
                                   docs/store_format.md), each starting 8-aligned, zero bytes after it
    keys     int64 (E,)            whole-store mode: the resident user ids, ascending
    offset   int64 (E,)            byte offset of keys[i]'s record in the arena
    length   int64 (E,)            behaviours n of keys[i]'s record

A batch of B users is resolved to ``src`` (B,) int64 — the byte offset of each user's record in the arena,
-1 for a user with none (cold start: absent from the store) — and ``n`` (B,) int64 behaviours.
Whole-store mode does it on the device (:func:`lookup`: ``torch.searchsorted`` of the ids in ``keys``,
no host work per user); cache mode on the host (the tier's index), the result copied in.

:func:`build_batch` then writes the device batch the decode reads — byte for byte the layout of
:mod:`cachestore.batch` (offsets | lengths | zero block at 16·B | records 8-aligned in request order), so
unpack, the fused kernel and :class:`cachestore.graphs.GraphedDecoder` need nothing new: the header from
``src`` and ``n`` with a cumulative sum, the records moved arena → batch by the zero-copy gather kernel
(:func:`cachestore.mapped.launch_gather`, 8-byte words; a device-to-device copy of the batch's bytes) on
CUDA, by numpy slices on CPU. Every step is shape-static and free of host syncs: it runs inside a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch

from cachestore.batch import zero_block_bytes
from cachestore.mapped import launch_gather
from cachestore.record import HEADER_SIZE, CacheLayout


def bytes_per_behaviour(layout: CacheLayout) -> int:
    """Record bytes per behaviour (``layout.record_size(n) = 32 + n * this``)."""
    return sum(layout.header_parts[2])


def lookup(ids: torch.Tensor, keys: torch.Tensor, offset: torch.Tensor, length: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, n) of ``ids`` (B,) int64 in the sorted ``keys`` (E,) (E >= 1): src = the record's arena offset or -1,
    n = its behaviours or 0. Device work only (searchsorted + three gathers)."""
    pos = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)  # (B,)
    found = keys[pos] == ids
    src = torch.where(found, offset[pos], torch.full_like(ids, -1))
    n = torch.where(found, length[pos], torch.zeros_like(ids))
    return src, n


def batch_header(src: torch.Tensor, n: torch.Tensor, layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The device batch's header for (src, n) (B,): ``head`` (2·B,) int64 = offsets | lengths (cold start: the
    zero block at 16·B, length 0), and the gather table (3, B) int64 in 8-byte words: arena word, batch word,
    words to move (0 for cold start)."""
    b = src.numel()
    present = src >= 0
    size = torch.where(present, HEADER_SIZE + n * bytes_per_behaviour(layout), torch.zeros_like(n))
    slots = (size + 7) & -8  # (B,) each record 8-aligned in the batch
    start = 16 * b + zero_block_bytes(layout)
    dst = start + torch.cumsum(slots, 0) - slots  # (B,)
    offsets = torch.where(present, dst, torch.full_like(dst, 16 * b))
    head = torch.cat([offsets, torch.where(present, n, torch.zeros_like(n))])  # (2B,)
    table = torch.stack([src.clamp(min=0) // 8, dst // 8, slots // 8])  # (3, B)
    return head, table


def build_batch(raw: torch.Tensor, src: torch.Tensor, n: torch.Tensor, arena: torch.Tensor, layout: CacheLayout,
                max_length: int, table: torch.Tensor | None = None) -> None:
    """Write the device batch of (src, n) (B,) into ``raw`` (uint8, >= the batch's bytes; its zero block at
    16·B already zero) from ``arena`` (uint8, 8-byte aligned records): header, then records. ``max_length``
    bounds every n (a static loop bound of the gather kernel on CUDA). ``table`` (3, B) int64: static
    staging for the gather table inside a CUDA graph (a fresh tensor when None)."""
    b = src.numel()
    head, tab = batch_header(src, n, layout)
    raw[: 16 * b].view(torch.int64).copy_(head)
    if table is not None:
        table.copy_(tab)
        tab = table
    if raw.device.type == "cuda":
        longest = layout.record_size(max_length)
        launch_gather(arena.view(torch.int64), tab, raw, 8, (longest + 7) & -8)
        return
    out, mem = raw.numpy(), arena.numpy()
    for s, d, w in tab.T.tolist():  # CPU: the same moves with numpy slices
        if w:
            out[8 * d : 8 * (d + w)] = mem[8 * s : 8 * (s + w)]


def batch_bytes(n: np.ndarray, layout: CacheLayout) -> int:
    """Bytes of the device batch for behaviours ``n`` (B,) of present users (host-side bound for the buffer)."""
    b = len(n)
    sizes = (HEADER_SIZE + n.astype(np.int64) * bytes_per_behaviour(layout) + 7) & -8
    return 16 * b + zero_block_bytes(layout) + int(sizes.sum())
