"""Host→device transfer of a packed batch (one copy, timed with CUDA events) and its unpacking.

:func:`to_device` copies ``HostBatch.tensor`` (the whole batch: offsets, lengths, zero block, records;
layout in :mod:`cachestore.decode.batch`) with ONE ``copy_(non_blocking=True)`` and returns the device batch
and a :class:`TransferCost`: bytes moved and the time between two CUDA events recorded on the copy's
stream around the copy (so the cost excludes Python overhead and queueing before the copy). The
host buffer may be refilled only after the copy: the end event is handed to the batch's buffer,
which waits on it before reuse. Without CUDA ("cpu" device) the copy is a memcpy timed with
``time.perf_counter``; the device batch never aliases the reusable host buffer.

:func:`unpack_entry` turns the jagged records on the device into padded per-part arrays, with no host
sync (``cachestore.store.entry.EntryLayout``): the payload is the layout's parts back to back, part p of
user b holding ``r_pb = min(n_b, cap_p)`` rows of ``row_bytes_p`` bytes, starting at
``record_start[b] + 32 + Σ_{q<p} r_qb·row_bytes_q``. Each part becomes a padded (B, R_p, width)
tensor, R_p = ``max(1, min(L, cap_p))`` (L = longest n in the batch or ``pad_to``), row r of user b read
from the buffer when r < r_pb, else from the zero block; kv parts
at the stored float dtype, q8 parts int8 codes, index parts int64 (B, R_p, 1), key parts uint8. A part is gathered in
int16 units when its row and every earlier part's row have an even byte count (its starts are then
even), else byte by byte (odd-width retrieval keys). ``model.entry.cache_from_arrays`` (through
:func:`cachestore.decode.decode.entry_cache`) turns them into the model's cache; a din batch's
:class:`model.cache.KVCache` is its group ``"kv"``.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from collectivekv.cachestore.decode.batch import HostBatch
from collectivekv.cachestore.decode.layer_batch import LayerBatch
from collectivekv.cachestore.store.record import HEADER_SIZE

if TYPE_CHECKING:
    from collectivekv.cachestore.store.entry import EntryLayout

KV_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TransferCost:
    """Bytes moved by one host→device copy and its duration.

    ``ms`` (CUDA) waits for the copy's end event, then reads the elapsed time between the two
    events; read it when the result is needed anyway (e.g. after the scores came back).
    """

    bytes: int
    device: str
    pinned: bool
    _start: Any = None
    _end: Any = None
    _seconds: float | None = None

    @property
    def ms(self) -> float:
        if self._seconds is None:
            self._end.synchronize()
            self._seconds = self._start.elapsed_time(self._end) / 1e3
        return self._seconds * 1e3

    @property
    def events(self) -> tuple[Any, Any] | None:
        """The CUDA events around the copy (None for a copy timed on the host): to place it on a timeline."""
        return None if self._start is None else (self._start, self._end)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.ms, 1e-9) / 1e6


@dataclass
class EntryBatch:
    """A batch unpacked on the device: ``arrays`` name → (B, R_p, width) per part of the
    layout (kv at the stored float dtype, q8 int8 codes, idx int64, keys uint8; zeros at padding) and ``lengths``
    (B,) int64 — the input of ``model.entry.cache_from_arrays``."""

    arrays: dict[str, torch.Tensor]
    lengths: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])


@dataclass
class DeviceBatch:
    """A packed batch on the device: ``raw`` uint8 (used_bytes,) plus the host-known shape facts."""

    raw: torch.Tensor
    layout: EntryLayout
    n_users: int
    max_length: int
    zero_offset: int

    @property
    def offsets(self) -> torch.Tensor:
        return self.raw[: 8 * self.n_users].view(torch.int64)

    @property
    def lengths(self) -> torch.Tensor:
        return self.raw[8 * self.n_users : 16 * self.n_users].view(torch.int64)

    def unpack(self, pad_to: int | None = None) -> EntryBatch:
        """The parts of this batch padded to ``min(L, cap)`` rows: L = pad_to (>= max_length) or
        max(1, max_length)."""
        length = max(1, self.max_length) if pad_to is None else int(pad_to)
        if length < self.max_length:
            raise ValueError(f"pad_to {pad_to} < longest history in the batch ({self.max_length})")
        return unpack_entry(self.raw, self.layout, self.n_users, length, self.zero_offset)


def to_device(batch: HostBatch, device: torch.device | str, *, stream: torch.cuda.Stream | None = None
              ) -> tuple[DeviceBatch, TransferCost]:
    """Copy a packed batch to ``device`` in one copy; returns (device batch, measured cost). A batch split by layer
    (:class:`cachestore.decode.layer_batch.LayerBatch`) is refused: only HSTU's graphs read it."""
    if isinstance(batch, LayerBatch):
        raise ValueError("a batch split by layer (LayerBatcher) is read by HSTU's CUDA graphs only "
                         "(GraphedDecoder.run); pack with HostBatcher for the eager path")
    device = torch.device(device)
    src = batch.tensor  # checks the batch is not stale
    meta = dict(layout=batch.layout, n_users=batch.n_users, max_length=batch.max_length,
                zero_offset=batch.zero_offset)
    if device.type == "cuda":
        current = torch.cuda.current_stream(device)
        stream = stream or current
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            dst = torch.empty(src.shape, dtype=torch.uint8, device=device)
            start.record(stream)
            dst.copy_(src, non_blocking=batch.pinned)
            end.record(stream)
        if stream != current:  # a side copy stream: work queued on the current stream waits for the copy
            current.wait_event(end)
            dst.record_stream(current)
        batch.mark_copied(end)
        return DeviceBatch(dst, **meta), TransferCost(src.numel(), str(device), batch.pinned, start, end)
    t0 = time.perf_counter()
    dst = src.to(device, copy=True)
    return DeviceBatch(dst, **meta), TransferCost(src.numel(), str(device), False, _seconds=time.perf_counter() - t0)


def _part(units16: torch.Tensor, pos: torch.Tensor, n_units: int) -> torch.Tensor:
    """(B, L) start positions (int16 units) → (B, L, n_units) int16 read from the buffer."""
    if n_units == 1:
        return units16[pos].unsqueeze(-1)
    rows = units16.as_strided((units16.numel() - n_units + 1, n_units), (1, 1))  # row r = units r..r+n-1
    return rows[pos]


def unpack_entry(raw: torch.Tensor, layout: EntryLayout, n_users: int, length: int, zero_offset: int,
                 parts: Collection[str] | None = None) -> EntryBatch:
    """Device-side inverse of the batch packing (see the module docstring).
    raw: uint8 buffer; length: L, the widest history to pad to (>= every n_b); parts: the names of the
    parts to unpack (default: all; the others are only stepped over)."""
    offsets = raw[: 8 * n_users].view(torch.int64)
    lengths = raw[8 * n_users : 16 * n_users].view(torch.int64)
    units16 = raw.view(torch.int16)
    start = offsets + HEADER_SIZE  # (B,) bytes: where the current part of each record starts
    even = True  # every part so far has even rows, so `start` is even (records are 8-aligned)
    arrays: dict[str, torch.Tensor] = {}
    for part, row_bytes in zip(layout.parts, layout.row_bytes, strict=True):
        width = max(1, min(length, part.cap))  # R_p
        rows = lengths.clamp(max=part.cap)  # (B,) rows user b has in this part
        even = even and row_bytes % 2 == 0
        if parts is not None and part.name not in parts:
            start = start + rows * row_bytes
            continue
        ar = torch.arange(width, device=raw.device)
        valid = ar.unsqueeze(0) < rows.unsqueeze(1)  # (B, R_p)
        if even:
            units = row_bytes // 2
            pos = torch.where(valid, (start // 2).unsqueeze(1) + ar * units, zero_offset // 2)  # (B, R_p)
            vals = _part(units16, pos, units).view(torch.uint8)  # (B, R_p, row_bytes)
        else:
            pos = torch.where(valid, start.unsqueeze(1) + ar * row_bytes, zero_offset)
            vals = _part(raw, pos, row_bytes)  # (B, R_p, row_bytes) uint8
        if part.kind == "kv":
            arrays[part.name] = vals.view(KV_TORCH[layout.kv_dtype])  # (B, R_p, width)
        elif part.kind == "q8":
            arrays[part.name] = vals.view(torch.int8)  # (B, R_p, width) int8 codes
        elif part.kind == "idx":
            idx = vals.view(torch.int16).to(torch.int64) & 0xFFFF if layout.idx_dtype == "uint16" else (
                vals.view(torch.int32).to(torch.int64))
            arrays[part.name] = idx  # (B, R_p, 1)
        else:
            arrays[part.name] = vals  # (B, R_p, width) uint8 packed keys
        start = start + rows * row_bytes
    return EntryBatch(arrays=arrays, lengths=lengths)
