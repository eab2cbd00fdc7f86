"""CUDA graphs for the din decode (record format v1): one graph replay per batch instead of ~100 launches.

At serving batch sizes the eager path (:func:`cachestore.transfer.unpack` + :func:`cachestore.decode.decode`)
is bound by per-op CPU dispatch and kernel launches (~1.6 ms at every B on an H100), not by bytes. For a
fixed shape — n_users B, padded length L (``pad_to``), candidates per user C, buffer capacity — the whole
device side is shape-static and free of host syncs, so it is captured once into a ``torch.cuda.CUDAGraph``
over static tensors and replayed per request:

    static raw (uint8, capacity bytes) ← ONE non_blocking copy of the HostBatch buffer (its used_bytes prefix)
    static candidates (B, C) int64     ← the request's candidates (or left as they are)
    replay: static_decode(raw, candidates) → static logits (B, C)

:func:`static_decode` is the captured body (it also runs eagerly on any device: the CPU tests compare it
with the runtime). Why it is static: L = ``pad_to`` and the zero block at 16·B are host-known; the
unpack gathers read each user's record at positions l < n_b and the zero block elsewhere, so bytes beyond
the batch's used_bytes (left over from a longer earlier batch) are never read; masking is arithmetic on
(B, L) masks (no boolean indexing, ``nonzero`` or ``.item()``); ``decode``'s path choice depends on shapes
only. Host-side checks (batch size, longest history <= L, used_bytes <= capacity) run before the copy.

Contract: copy and replay run on the caller's current stream, so the next batch's copy cannot overwrite
the buffer before the previous replay has read it; the returned logits tensor is the graph's static
output and is overwritten by the next replay (read or clone it first). Candidate ids must be valid items
(0..n_items), checked on the host by the caller (an out-of-range id is a device-side assert).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cachestore.batch import HostBatch, is_entry_layout, zero_block_bytes
from cachestore.decode import PATHS, ResidentModel, choose_path, decode
from cachestore.fused import DEFAULT_FUSED, FUSED, FusedConfig, fused_decode, uses_fused
from cachestore.record import CacheLayout
from cachestore.transfer import TransferCost, unpack


def _align8(n: int) -> int:
    return (int(n) + 7) & ~7


def batch_capacity(layout: CacheLayout, n_users: int, pad_to: int) -> int:
    """Bytes a packed batch of ``n_users`` users with at most ``pad_to`` behaviours each can need."""
    return _align8(16 * n_users + zero_block_bytes(layout) + n_users * _align8(layout.record_size(pad_to)))


def static_decode(raw: torch.Tensor, candidates: torch.Tensor, *, resident: ResidentModel, layout: CacheLayout,
                  n_users: int, pad_to: int, path: str, fused: FusedConfig = DEFAULT_FUSED) -> torch.Tensor:
    """Logits (B, C) of a packed batch held in the prefix of ``raw`` (uint8, even length; bytes beyond the
    batch are never read): unpack padded to ``pad_to`` with the zero block at 16·n_users, then decode;
    path "fused" reads the records in place instead (:func:`cachestore.fused.fused_decode` launched with
    ``fused``, no unpack).
    Shape-static and free of host syncs (the body :class:`GraphedDecoder` captures)."""
    if path == FUSED:
        return fused_decode(resident, raw, layout, n_users, candidates, config=fused)
    cache = unpack(raw, layout, n_users, pad_to, 16 * n_users)
    return decode(resident, cache, candidates, path)


class GraphedDecoder:
    """One captured unpack + decode for fixed (n_users B, pad_to L, n_candidates C, capacity) on CUDA.

    resident: the model on its CUDA device; layout: the v1 store's CacheLayout; path: "auto" ("fused" on CUDA
    with Triton, else resolved from the shapes, :func:`cachestore.decode.choose_path`), "fused", "poolscore"
    or "gather";
    capacity: static buffer bytes (default :func:`batch_capacity`); fused: the fused kernel's launch
    settings (:class:`cachestore.fused.FusedConfig`, e.g. fp16 pools). ``eager=True`` runs
    :func:`static_decode` on the same static buffers without a graph (any device; for tests).
    Use :meth:`run` (copy + replay) or :meth:`load` then :meth:`replay`.

    ``chunks`` > 1 (path "fused" only; divides n_users) overlaps the copy with the decode: the users
    split into ``chunks`` equal groups, one graph per group (``fused_decode(user0=...)`` writing its rows
    of the static logits); :meth:`run` copies group k's byte range (the header and zero block go with
    group 0; records are in user order, :func:`chunk_bounds`) on a side copy stream and replays graph k
    on the current stream as soon as that range has landed, so group k's decode runs while group k+1
    is copied. :attr:`last_cost` is the copy's :class:`TransferCost` (first chunk start → last chunk end).
    """

    def __init__(self, resident: ResidentModel, layout: CacheLayout, *, n_users: int, pad_to: int,
                 n_candidates: int = 1, capacity: int | None = None, path: str = "auto", warmup: int = 3,
                 eager: bool = False, chunks: int = 1, fused: FusedConfig = DEFAULT_FUSED) -> None:
        self.device = torch.device(resident.device)
        if not eager and (self.device.type != "cuda" or not torch.cuda.is_available()):
            raise RuntimeError(f"CUDA graphs need a CUDA device; the model is on {self.device}: "
                               "use the eager path (DecodeRuntime without graphs, or cachestore.decode.decode)")
        if is_entry_layout(layout):
            raise ValueError("CUDA graphs cover the din decode of record format v1 stores only (this is a v2 store)")
        if path not in (*PATHS, FUSED):
            raise ValueError(f"path must be one of {(*PATHS, FUSED)}, got {path!r}")
        if min(n_users, pad_to, n_candidates) < 1:
            raise ValueError(f"n_users, pad_to and n_candidates must be >= 1, got {n_users}, {pad_to}, {n_candidates}")
        self.resident, self.layout, self.eager, self.fused = resident, layout, eager, fused
        self.n_users, self.pad_to, self.n_candidates = n_users, pad_to, n_candidates
        need = 16 * n_users + zero_block_bytes(layout)
        self.capacity = _align8(max(capacity or batch_capacity(layout, n_users, pad_to), need))
        with torch.inference_mode():
            self.raw = torch.zeros(self.capacity, dtype=torch.uint8, device=self.device)
            head = torch.tensor([16 * n_users] * n_users + [0] * n_users, dtype=torch.int64)  # offsets, lengths
            self.raw[: 16 * n_users].copy_(head.view(torch.uint8))  # every user cold until the first load
            self.candidates = torch.zeros(n_users, n_candidates, dtype=torch.int64, device=self.device)
            path = FUSED if uses_fused(path, self.device) else path
            self.path = path if path != "auto" else choose_path(
                unpack(self.raw, layout, n_users, pad_to, 16 * n_users), n_candidates, resident)
            if chunks < 1 or n_users % chunks or (chunks > 1 and self.path != FUSED):
                raise ValueError(f"chunks must divide n_users ({n_users}) and needs path 'fused' when > 1; "
                                 f"got {chunks} with path {self.path!r}")
            self.chunks = chunks
            self.graph: torch.cuda.CUDAGraph | None = None
            self.graphs: list[torch.cuda.CUDAGraph] = []  # one per chunk (chunks > 1)
            self.last_cost: TransferCost | None = None
            if chunks > 1:
                self.logits = torch.empty(n_users, n_candidates, dtype=resident.dtype, device=self.device)
            self._decode_eagerly()
            if not eager:
                self._capture(warmup)

    def _body(self) -> torch.Tensor:
        return static_decode(self.raw, self.candidates, resident=self.resident, layout=self.layout,
                             n_users=self.n_users, pad_to=self.pad_to, path=self.path, fused=self.fused)

    def _decode_eagerly(self) -> None:
        """The whole decode without a graph: the one body, or every chunk's in order."""
        if self.chunks == 1:
            self.logits = self._body()
        else:
            for k in range(self.chunks):
                self._chunk_body(k)

    def _chunk_body(self, k: int) -> None:
        """Decode chunk k's users into their rows of the static logits."""
        m = self.n_users // self.chunks
        u0 = k * m
        out = fused_decode(self.resident, self.raw, self.layout, self.n_users, self.candidates[u0 : u0 + m], user0=u0,
                           config=self.fused)
        self.logits[u0 : u0 + m].copy_(out)

    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream (lazy inits, cuBLAS workspaces, allocator), then capture."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    self._decode_eagerly()
            current.wait_stream(side)
            torch.cuda.synchronize()
            if self.chunks > 1:
                self._copy_stream = torch.cuda.Stream(self.device)
                pool = torch.cuda.graph_pool_handle()  # the chunk graphs share one memory pool
                for k in range(self.chunks):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._chunk_body(k)
                    self.graphs.append(graph)
                return
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._body()

    def check(self, host: HostBatch) -> None:
        """Raise ValueError unless ``host`` fits this graph's static shapes (host-side only)."""
        if host.layout != self.layout:
            raise ValueError("the batch was packed for another store layout than this graph's")
        if host.n_users != self.n_users or host.zero_offset != 16 * self.n_users:
            raise ValueError(f"the batch has {host.n_users} users; this graph takes exactly {self.n_users} "
                             "(pad the batch with cold-start slots: HostBatcher.fetch(ids, n_slots=))")
        if host.max_length > self.pad_to:
            raise ValueError(f"pad_to {self.pad_to} < longest history in the batch ({host.max_length})")
        if host.used_bytes > self.capacity:
            raise ValueError(f"the batch needs {host.used_bytes} bytes; the graph's buffer holds {self.capacity}")

    def load(self, host: HostBatch, candidates: torch.Tensor | None = None) -> TransferCost:
        """Copy ``host``'s buffer prefix into the static buffer (one copy, non_blocking from pinned memory;
        timed with CUDA events like :func:`cachestore.transfer.to_device`) and, if given, ``candidates``
        (B, C) into the static candidates. Issued on the current stream."""
        self.check(host)
        src = host.tensor
        with torch.inference_mode():
            if candidates is not None:
                self.candidates.copy_(candidates.reshape(self.n_users, self.n_candidates), non_blocking=True)
            if self.device.type != "cuda":
                t0 = time.perf_counter()
                self.raw[: src.numel()].copy_(src)
                return TransferCost(src.numel(), str(self.device), False, _seconds=time.perf_counter() - t0)
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self.raw[: src.numel()].copy_(src, non_blocking=host.pinned)
            end.record(stream)
        host.mark_copied(end)  # the batcher refills this host buffer only after the copy
        return TransferCost(src.numel(), str(self.device), host.pinned, start, end)

    def replay(self) -> torch.Tensor:
        """Decode what the static buffers hold; returns the static logits (B, C), valid until the next replay."""
        if self.graphs:
            for graph in self.graphs:
                graph.replay()
        elif self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._decode_eagerly()
        return self.logits

    def run(self, host: HostBatch, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`load` + :meth:`replay`; with ``chunks`` > 1 the pipelined copy + replays (class docstring)."""
        if self.chunks == 1:
            self.last_cost = self.load(host, candidates)
            return self.replay()
        self.check(host)
        src = host.tensor
        bounds = chunk_bounds(host, self.chunks)
        with torch.inference_mode():
            if candidates is not None:
                self.candidates.copy_(candidates.reshape(self.n_users, self.n_candidates), non_blocking=True)
            if not self.graphs:  # eager (tests): the same chunks, in order
                t0 = time.perf_counter()
                self.raw[: src.numel()].copy_(src)
                self.last_cost = TransferCost(src.numel(), str(self.device), False, _seconds=time.perf_counter() - t0)
                self._decode_eagerly()
                return self.logits
            current, copy = torch.cuda.current_stream(self.device), self._copy_stream
            copy.wait_stream(current)  # earlier replays have finished reading the buffer
            start = torch.cuda.Event(enable_timing=True)
            landed = []
            with torch.cuda.stream(copy):
                start.record(copy)
                for lo, hi in bounds:
                    if hi > lo:
                        self.raw[lo:hi].copy_(src[lo:hi], non_blocking=host.pinned)
                    event = torch.cuda.Event(enable_timing=True)
                    event.record(copy)
                    landed.append(event)
            for event, graph in zip(landed, self.graphs, strict=True):
                current.wait_event(event)
                graph.replay()
        host.mark_copied(landed[-1])
        self.last_cost = TransferCost(src.numel(), str(self.device), host.pinned, start, landed[-1])
        return self.logits


def chunk_bounds(host: HostBatch, chunks: int) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi) of ``host``'s buffer holding what each of ``chunks`` equal user groups needs:
    group 0 from byte 0 (offsets, lengths, zero block, its records), group k from the first record of a
    present user at or after its first user (records follow request order), the last up to used_bytes."""
    m = host.n_users // chunks
    starts = np.where(host.present, host.offsets, host.used_bytes).astype(np.int64)
    first = np.minimum.accumulate(starts[::-1])[::-1]  # first record start among users >= u
    cuts = [0] + [int(first[k * m]) for k in range(1, chunks)] + [int(host.used_bytes)]
    return [(cuts[k], cuts[k + 1]) for k in range(chunks)]
