"""The copy plan of a captured batch (:class:`cachestore.decode.graphs.GraphedDecoder`): a packed batch's byte capacity,
the copy-size buckets of its graphs, the pieces an overlapped copy is split into and the fused launches' record
ranges. Plain integer arithmetic (no torch)."""

from __future__ import annotations

import math

from collectivekv.cachestore.decode.batch import zero_block_bytes
from collectivekv.cachestore.decode.fused_config import ALL_BYTES
from collectivekv.cachestore.store.entry import EntryLayout


def align8(n: int) -> int:
    return (int(n) + 7) & ~7


def batch_capacity(layout: EntryLayout, n_users: int, pad_to: int) -> int:
    """Bytes a packed batch of ``n_users`` users with at most ``pad_to`` behaviours each can need."""
    return align8(16 * n_users + zero_block_bytes(layout) + n_users * align8(layout.record_size(pad_to)))


_MIN_BUCKET = 64 << 10  # smallest captured copy (bytes)


def copy_buckets(capacity: int) -> list[int]:
    """Ascending copy sizes of the captured graphs: ``capacity`` divided by √2 repeatedly, 8-aligned,
    down to 64 KiB (or just ``capacity`` when it is smaller)."""
    sizes, size = [], float(capacity)
    while True:
        sizes.append(align8(math.ceil(size)))
        size /= math.sqrt(2)
        if size < _MIN_BUCKET:
            return sorted(set(sizes))


DEFAULT_OVERLAP = 3  # copy pieces beside the fused decode (GraphedDecoder; din and HSTU: measured best on an H100)
# the zoo's short and long stages per piece: every launch runs its whole grid (the other pieces' users exit at once),
# so more pieces pay more of that; the fastest K of `benchmarks/zoo_overlap.py` on an H100 (zoo_overlap_float16.json;
# TWIN's fp32 stores: zoo_overlap_twin_float32.json)
ARCH_OVERLAP = {"sim": 2, "eta": 3, "sdim": 2, "twin": 3}
DTYPE_OVERLAP = {("twin", "float32"): 4}  # (arch, kv dtype) whose fastest K is not ARCH_OVERLAP's


# the first buffer of an HSTU batch split by layer (cachestore.decode.layer_batch): 2 pieces, the fastest of 1-4 on an
# H100 in both dtypes (benchmarks/zoo_overlap.py, HSTU rows: zoo_overlap_hstu_float{16,32}.json)
LAYER_OVERLAP = 2


def default_overlap(arch: str, kv_dtype: str = "float16") -> int:
    """Copy pieces a captured batch of a model of ``arch`` whose store holds ``kv_dtype`` parts is split into by
    default."""
    return DTYPE_OVERLAP.get((arch, kv_dtype), ARCH_OVERLAP.get(arch, DEFAULT_OVERLAP))


_MIN_CHUNK = 256 << 10  # smallest overlapped copy chunk (bytes): below it a chunk's fixed cost dominates


def copy_chunks(nbytes: int, header_bytes: int, overlap: int) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi) the batch copy of ``nbytes`` is split into: ``overlap`` pieces (fewer where a piece
    would be under 256 KiB), 8-aligned, the first holding the ``header_bytes`` batch header. One range
    [0, nbytes) without overlap."""
    k = max(1, min(overlap, nbytes // _MIN_CHUNK))
    cuts = [min(align8(header_bytes + (nbytes - header_bytes) * i // k), nbytes) for i in range(1, k)]
    edges = sorted(set([0, *cuts, nbytes]))
    return list(zip(edges[:-1], edges[1:], strict=True))


def record_ends(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The fused kernel's launch ranges for copy ``pieces``: launch c serves the users whose records end in
    (lo, hi] — every byte of them copied by piece c or before; the first and last ranges open-ended."""
    (first, last), = ALL_BYTES
    edges = [first, *(hi for _, hi in pieces[:-1]), last]
    return list(zip(edges[:-1], edges[1:], strict=True))
