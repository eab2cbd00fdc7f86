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
    Use :meth:`run` (copy + replay; :attr:`last_cost` is the copy's :class:`TransferCost`) or
    :meth:`load` then :meth:`replay`. (Overlapping the copy with the decode in user chunks, one graph
    per chunk on a side copy stream, was measured on an H100 and was slower at every batch size —
    ``benchmarks/results/decode_latency_nosplit.json`` / ``decode_latency.json``, ``c_graph_chunked_all``
    — so the decoder copies once and replays once.)
    """

    def __init__(self, resident: ResidentModel, layout: CacheLayout, *, n_users: int, pad_to: int,
                 n_candidates: int = 1, capacity: int | None = None, path: str = "auto", warmup: int = 3,
                 eager: bool = False, fused: FusedConfig = DEFAULT_FUSED) -> None:
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
            self.graph: torch.cuda.CUDAGraph | None = None
            self.last_cost: TransferCost | None = None
            self.logits = self._body()  # eager once: checks the body, and the static output off CUDA
            if not eager:
                self._capture(warmup)

    def _body(self) -> torch.Tensor:
        return static_decode(self.raw, self.candidates, resident=self.resident, layout=self.layout,
                             n_users=self.n_users, pad_to=self.pad_to, path=self.path, fused=self.fused)

    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream (lazy inits, cuBLAS workspaces, allocator), then capture."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    self._body()
            current.wait_stream(side)
            torch.cuda.synchronize()
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
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self.logits = self._body()
        return self.logits

    def run(self, host: HostBatch, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`load` + :meth:`replay`."""
        self.last_cost = self.load(host, candidates)
        return self.replay()
