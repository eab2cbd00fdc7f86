"""The resident tier's memory: one device buffer the decode reads in place, and the lookup that points into it.

Layout of the arena (uint8, on the tier's device — CUDA, or host memory on CPU):

    offset            size             content
    0                 16·B             batch header of the request being decoded: offsets int64 (B,) | lengths
                                       int64 (B,) — the header of a packed batch (:mod:`cachestore.decode.batch`)
    16·B              Z                zero block (cold-start users point here, length 0)
    header_bytes(Bmax) ...             records verbatim (the LMDB value: 32-byte header + payload,
                                       docs/store_format.md), each starting 8-aligned

so the arena IS a packed batch whose records are the whole tier: a request writes only its 16·B-byte header
(offsets of its users' records inside the arena) and the decode — the fused kernel, or unpack + decode —
reads the records where they lie. No record is copied per request, on the host or on the device.
Requests share the header area, so they run one at a time per tier (the tier's lock; one stream).

Index (whole-store mode), on the device (:class:`KeyIndex`): ``keys`` int64 (E,) the resident user ids ascending,
``offset`` int64 (E,) each record's byte offset in the arena, ``length`` int64 (E,) its behaviours, and a directory
over the keys (``starts``: where each of D ranges of ids begins), so that a lookup searches a few keys instead of
all E. :func:`write_header` looks a request's ids up: on CUDA one Triton kernel (:func:`_lookup_kernel`: per id the
directory's two bounds, a binary search between them, the header and the present mask written, the zero block
cleared, the request's candidates copied in, the decode's index flags zeroed; the ids and candidates read where the
host wrote them, in pinned memory), elsewhere the same with ``torch.searchsorted`` (:func:`lookup`). Cache mode
resolves on the host and copies the header in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import zero_block_bytes
from collectivekv.cachestore.store.entry import EntryLayout

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def header_bytes(layout: EntryLayout, max_users: int) -> int:
    """Bytes reserved at the arena's start for the header and zero block of requests of <= max_users users
    (rounded up to 256 so records start aligned)."""
    return (16 * max_users + zero_block_bytes(layout) + 255) & -256


@dataclass(frozen=True)
class KeyIndex:
    """Where the resident users' records lie (module docstring), on the tier's device: keys (E,) ascending, offset
    (E,), length (E,) int64; ``starts`` (D + 1,) int64: starts[j] = the first position whose key is >= kmin +
    j·2^shift (starts[D] = E), so a key x with kmin <= x <= kmax lies in keys[starts[j] : starts[j + 1]] for
    j = (x - kmin) >> shift (D = 1: the whole array); ``steps``: halvings that search the largest of those ranges."""

    keys: torch.Tensor
    offset: torch.Tensor
    length: torch.Tensor
    starts: torch.Tensor
    kmin: int
    kmax: int
    shift: int
    steps: int


def key_index(keys: np.ndarray, offset: np.ndarray, length: np.ndarray, device: torch.device) -> KeyIndex:
    """The :class:`KeyIndex` of ``keys`` (E,) int64 ascending, E >= 1: D ranges of ids, D the largest power of two
    <= E / 2 (2 to 4 users a range where ids spread evenly over kmin .. kmax; D = 1 below 4 keys, or when the span
    needs 62 bits or more). O(E) on the host: each key's range, counted."""
    kmin, kmax = int(keys[0]), int(keys[-1])
    span = kmax - kmin
    d = 1 << max(0, (len(keys) // 2).bit_length() - 1) if span < 1 << 62 else 1
    shift = max(0, span.bit_length() - (d.bit_length() - 1))  # span >> shift < d
    if d > 1:
        counts = np.bincount((keys - kmin) >> shift, minlength=d)  # (D,) keys per range
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    else:
        starts = np.array([0, len(keys)], np.int64)
    widest = int(np.diff(starts).max())
    return KeyIndex(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (keys, offset, length, starts)),
                    kmin=kmin, kmax=kmax, shift=shift, steps=max(1, widest.bit_length() + 1))


def lookup(ids: torch.Tensor, keys: torch.Tensor, offset: torch.Tensor, length: torch.Tensor, zero_at: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets, lengths, present) (B,) of ``ids`` (B,) int64 in the sorted ``keys`` (E,), E >= 1: the record's
    arena offset and behaviours, or ``zero_at`` and 0 for an id not resident (-1 padding included)."""
    pos = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)  # (B,)
    found = keys[pos] == ids
    offsets = torch.where(found, offset[pos], torch.full_like(ids, zero_at))
    return offsets, torch.where(found, length[pos], torch.zeros_like(ids)), found


def write_header(arena: torch.Tensor, ids: torch.Tensor, index: KeyIndex, present: torch.Tensor, layout: EntryLayout,
                 candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
                 flags: torch.Tensor | None = None) -> None:
    """Look ``ids`` (B,) up in ``index`` and write the request's header and zero block at the arena's start and the
    ``present`` (B,) bool mask; with ``candidates`` = (src, dst), two int64 tensors of one size, also copy src
    into dst; with ``flags`` ((B,) int32), zero them. On CUDA one kernel does it all, and ``ids`` and ``src`` may
    lie in pinned host memory: the kernel reads them over PCIe (a CUDA graph then has no copy node before it).
    Shape-static and free of host syncs (captured in the resident graph)."""
    b = ids.numel()
    zero = zero_block_bytes(layout)
    src, dst = candidates if candidates is not None else (ids[:0], ids[:0])
    zero_flags = flags if flags is not None else present[:0].int()
    if src.numel() != dst.numel():
        raise ValueError(f"candidates to copy: {src.numel()} ids into {dst.numel()} places")
    if arena.is_cuda and triton is not None:
        block = 256
        programs = triton.cdiv(max(b, src.numel(), zero_flags.numel(), 1), block)
        _lookup_kernel[(programs,)](
            ids, index.keys, index.offset, index.length, index.starts, index.kmin, index.kmax, index.shift,
            arena.view(torch.int64), present, b, index.keys.numel(), zero // 8, src, dst, src.numel(), zero_flags,
            zero_flags.numel(), RANGES=index.starts.numel() > 2, STEPS=index.steps, BLOCK=block,
            ZBLOCK=triton.next_power_of_2(zero // 8))
        return
    offsets, lengths, found = lookup(ids.to(index.keys.device, non_blocking=True), index.keys, index.offset,
                                     index.length, 16 * b)
    arena[: 16 * b].view(torch.int64).copy_(torch.cat([offsets, lengths]))
    arena[16 * b : 16 * b + zero].zero_()
    present.copy_(found)
    dst.copy_(src.view(dst.shape), non_blocking=True)
    zero_flags.zero_()


if triton is not None:

    @triton.jit
    def _lookup_kernel(ids_ptr, keys_ptr, off_ptr, len_ptr, starts_ptr, kmin, kmax, shift, head_ptr, present_ptr, B,
                       E, ZWORDS, src_ptr, dst_ptr, NC, flags_ptr, NF, RANGES: tl.constexpr, STEPS: tl.constexpr,
                       BLOCK: tl.constexpr, ZBLOCK: tl.constexpr):
        """Program p: ids p·BLOCK ..; the directory's range of each id (RANGES; else all E keys), a lower-bound
        binary search in it (STEPS >= log2(widest range) + 1 halvings), then head[i] = offset or 16·B (the zero
        block), head[B + i] = length or 0, present[i]; program 0 clears the zero block (ZWORDS int64 words at
        head[2B:]); dst[j] = src[j] for its j = p·BLOCK .. (j < NC); flags[i] = 0 (i < NF)."""
        p = tl.program_id(0)
        i = p * BLOCK + tl.arange(0, BLOCK)
        m = i < B
        x = tl.load(ids_ptr + i, mask=m, other=-1)
        c = tl.load(src_ptr + i, mask=i < NC, other=0)  # issued with the ids: both may cross PCIe
        near = m & (x >= kmin) & (x <= kmax)  # ids outside the keys' span are not resident
        if RANGES:
            j = tl.where(near, (x - kmin) >> shift, 0)  # (BLOCK,) the id's range of the directory
            lo = tl.load(starts_ptr + j, mask=near, other=0)
            hi = tl.load(starts_ptr + j + 1, mask=near, other=0)
        else:
            lo = tl.zeros([BLOCK], dtype=tl.int64)
            hi = tl.where(near, E, 0).to(tl.int64)
        for _ in range(STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            k = tl.load(keys_ptr + mid, mask=active, other=0)
            less = k < x
            lo = tl.where(active & less, mid + 1, lo)
            hi = tl.where(active & (~less), mid, hi)
        inside = near & (lo < E)
        k = tl.load(keys_ptr + lo, mask=inside, other=0)
        found = inside & (k == x)
        off = tl.load(off_ptr + lo, mask=found, other=0)
        n = tl.load(len_ptr + lo, mask=found, other=0)
        tl.store(head_ptr + i, tl.where(found, off, 16 * B), mask=m)
        tl.store(head_ptr + B + i, tl.where(found, n, 0), mask=m)
        tl.store(present_ptr + i, found, mask=m)
        tl.store(dst_ptr + i, c, mask=i < NC)
        tl.store(flags_ptr + i, tl.zeros([BLOCK], dtype=tl.int32), mask=i < NF)
        z = tl.arange(0, ZBLOCK)
        tl.store(head_ptr + 2 * B + z, tl.zeros([ZBLOCK], dtype=tl.int64), mask=(z < ZWORDS) & (p == 0))
