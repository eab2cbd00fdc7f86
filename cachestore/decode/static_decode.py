"""The decode body a CUDA graph captures (:class:`cachestore.decode.graphs.GraphedDecoder`): :func:`static_decode`
reads a packed batch in place (fused) or unpacks it padded to a fixed length, shape-static and free of host
syncs on the fused path; it also runs eagerly on any device.

Every model has the same graph: din's body is :func:`cachestore.decode.fused.fused_decode`; SIM, ETA, SDIM and TWIN's
:func:`cachestore.decode.fused_zoo.zoo_static_decode`; HSTU's :func:`cachestore.decode.fused_hstu.hstu_static_decode`
— each
reads the copied records in place (Triton), shape-static and free of host syncs. din's attention and HSTU's first
layer and the short and long stages of SIM, ETA, SDIM and TWIN are launched once per copy piece (``chunks``, din's
``overlap``); every body takes ``on_chunk`` around its reads of the batch, so the candidates' own work (HSTU: its first
layer's) runs beside its copy. Without Triton (CPU tests) the eager
body unpacks the batch and runs the model's own ``decode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from collectivekv.cachestore.decode.decode import ResidentZooModel, decode, decode_zoo_batch, din_cache
from collectivekv.cachestore.decode.fused import ALL_BYTES, DEFAULT_FUSED, FUSED, FusedConfig, fused_decode
from collectivekv.cachestore.decode.fused_hstu import hstu_static_decode
from collectivekv.cachestore.decode.fused_zoo import zoo_static_decode
from collectivekv.cachestore.decode.transfer import unpack_entry
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.model.cache import KVCache


def unpack_din(raw: torch.Tensor, layout: EntryLayout, n_users: int, pad_to: int) -> KVCache:
    """The padded din cache (B = n_users, L = pad_to) of a packed batch in the prefix of ``raw``, its zero
    block at 16·n_users (:func:`cachestore.decode.transfer.unpack_entry`, then the group ``"kv"``)."""
    return din_cache(unpack_entry(raw, layout, n_users, pad_to, 16 * n_users))


def static_decode(raw: torch.Tensor, candidates: torch.Tensor, *, resident: ResidentZooModel, layout: EntryLayout,
                  n_users: int, pad_to: int, path: str, fused: FusedConfig = DEFAULT_FUSED,
                  chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                  on_chunk: Callable[[int], None] | None = None, flags: torch.Tensor | None = None,
                  rest: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, C) of a packed batch held in the prefix of ``raw`` (uint8, even length; bytes beyond the
    batch are never read): unpack padded to ``pad_to`` with the zero block at 16·n_users, then decode;
    path "fused" reads the records in place instead (:func:`cachestore.decode.fused.fused_decode` launched with
    ``fused``, no unpack, one launch per byte range of ``chunks``, each after ``on_chunk``: see
    :func:`cachestore.decode.fused.fused_attention`; the other paths ignore both). ``flags`` ((B,) int32): set to 1
    for users with a router index outside the pool (:func:`cachestore.decode.decode.bound_router_indices`).
    A zoo model's "fused" body is its own kernels' decode (``chunks`` split HSTU's first layer's history launches
    and the SIM, ETA, SDIM, TWIN stages as din's attention); its other
    paths unpack and run ``model.decode`` (eager only: not capturable; indices outside the pool flagged and read
    as 0, :func:`cachestore.decode.decode.bound_entry_indices`). Shape-static and free of host syncs on the fused
    path (the body :class:`GraphedDecoder` captures). ``rest``: the second buffer of a batch split by layer
    (:mod:`cachestore.decode.layer_batch`; HSTU's fused path only)."""
    arch = resident.cfg.arch
    if rest is not None and (path != FUSED or arch != "hstu"):
        raise ValueError("a batch split by layer is read by HSTU's fused decode only")
    if arch != "din":
        if path == FUSED and arch == "hstu":
            return hstu_static_decode(raw, candidates, resident=resident, layout=layout, n_users=n_users,
                                      config=fused, flags=flags, chunks=chunks, on_chunk=on_chunk, rest=rest)
        if path == FUSED:
            return zoo_static_decode(raw, candidates, resident=resident, layout=layout, n_users=n_users,
                                     config=fused, flags=flags, chunks=chunks, on_chunk=on_chunk)
        return decode_zoo_batch(resident, unpack_entry(raw, layout, n_users, pad_to, 16 * n_users), layout, candidates,
                                flags)
    if path == FUSED:
        return fused_decode(resident, raw, layout, n_users, candidates, config=fused, chunks=chunks, on_chunk=on_chunk,
                            flags=flags)
    return decode(resident, unpack_din(raw, layout, n_users, pad_to), candidates, path, flags=flags)
