"""A packed HSTU batch split by layer: the first layer's bytes of every record in one host buffer, the later layers'
in a second, so that a CUDA graph copies the first layer's bytes first and the later layers' beside its attention.

In the one-buffer batch (:mod:`cachestore.decode.batch`) the records lie user after user, so the last users' first
layer lands with the batch's last byte, and every later layer waits for the first layer of every user. An HSTU
record is its 32-byte header, then the first layer's parts, then the later layers' (every part min(n, max_len)
rows, :func:`split_layouts`). :class:`LayerBatcher` packs (B users, m_b = min(n_b, max_len) rows, F and R the
first layer's and every part's bytes per behaviour):

    first buffer (a batch of the first layer's records, :attr:`LayerBatch.tensor`)
        0       8·B     offsets  int64[B]  user b's record start (header + first layer) in this buffer
        8·B     8·B     lengths  int64[B]
        16·B    8·B     rest offsets int64[B]  32 bytes before user b's later layers in the second buffer
        24·B    8·B     lengths  int64[B]  (again: bytes 16·B .. 32·B are the second buffer's batch header)
        32·B    Z       zero block
        ...             per present user, 8-aligned: header (32 B) + m_b·F bytes of the first layer's parts
    second buffer (:attr:`LayerBatch.rest_tensor`)
        0       32      zeros (the rest offsets are >= 0)
        32      ...     per present user, 8-aligned: the m_b·(R - F) bytes of the later layers' parts

Cold-start users: offsets at the zero block, rest offsets 0, length 0. The headers are checked as
:class:`cachestore.decode.batch.HostBatcher` checks them (the same errors, naming the user), the record bytes copied
once (two memcpys per user instead of one). :class:`cachestore.decode.graphs.GraphedDecoder` copies the first buffer
(in pieces, the first layer's launches after each), then the second, and
:func:`cachestore.decode.fused_hstu.hstu_static_decode` reads layer 0 from the first with the first-layer layout and
the later layers from the second (its header at bytes 16·B of the first) with theirs.
``tests/cachestore/decode/test_layer_batch.py`` checks the bytes, the errors and the decode.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import _WORDS, HostBatch, HostBatcher, _Buffer, ring_slot, zero_block_bytes
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.record import HEADER_SIZE, RecordSizeError

REST_PAD = HEADER_SIZE  # the second buffer's first bytes: its records' offsets (32 before their parts) stay >= 0


def header_bytes(n_users: int) -> int:
    """Bytes of a split batch's header (offsets, lengths, rest offsets, lengths): where its zero block starts."""
    return 32 * n_users


@functools.cache
def split_layouts(layout: EntryLayout) -> tuple[EntryLayout, EntryLayout] | None:
    """(first, rest): the layouts of an HSTU record's first layer and of its later layers, where a record of ``layout``
    is its header, the first layer's parts, then the others' (several layers, every part ``min(n, max_len)`` rows); None
    for another store (the one test every user of a split batch makes)."""
    groups = layout.groups
    if (layout.arch != "hstu" or len(groups) < 2
            or any(p.kind == "key" or p.cap != layout.max_len for p in layout.parts)):
        return None
    lead = [p.name.split(".", 1)[0] == groups[0].name for p in layout.parts]
    if lead != sorted(lead, reverse=True):  # the first group's parts lead the record
        return None
    k = sum(lead)
    return (dataclasses.replace(layout, parts=layout.parts[:k]), dataclasses.replace(layout, parts=layout.parts[k:]))


def capacities(layout: EntryLayout, n_users: int, pad_to: int) -> tuple[int, int]:
    """Bytes of the first and the second buffer of a batch of ``n_users`` users of at most ``pad_to`` behaviours
    ((0, 0): the layout does not split)."""
    split = split_layouts(layout)
    if split is None:
        return 0, 0
    first, rest = (n_users * ((part.record_size(pad_to) - skip + 7) & -8) for part, skip in zip(split, (0, HEADER_SIZE),
                                                                                                 strict=True))
    return header_bytes(n_users) + zero_block_bytes(layout) + first + 8, REST_PAD + rest + 8


@dataclass
class LayerBatch(HostBatch):
    """A :class:`cachestore.decode.batch.HostBatch` split by layer (module docstring): the inherited buffer and
    ``used_bytes`` are the first buffer's; ``rest_bytes`` the second's (:attr:`rest`, :attr:`rest_tensor`)."""

    rest_bytes: int = 0
    _rest: _Buffer | None = field(default=None, repr=False)
    _rest_generation: int = field(default=0, repr=False)

    def check_valid(self) -> None:
        super().check_valid()
        if self._rest is None or self._rest.generation != self._rest_generation:
            raise RuntimeError("LayerBatch is stale: its buffers were reused by a later fetch")

    @property
    def rest(self) -> torch.Tensor:
        """uint8 view of the WHOLE second buffer (a fixed source for captured copies)."""
        self.check_valid()
        return self._rest.tensor

    @property
    def rest_tensor(self) -> torch.Tensor:
        """uint8 (rest_bytes,) view of the second buffer: what its copy moves."""
        return self.rest[: self.rest_bytes]

    def mark_copied(self, event: Any) -> None:
        super().mark_copied(event)
        self._rest.pending = event

    def record(self, b: int) -> bytes | None:
        """User b's record (header, first layer, later layers) reassembled, or None for a cold-start user."""
        self.check_valid()
        if not self.present[b]:
            return None
        n = self.offsets.shape[0]
        start, rest = int(self.offsets[b]), int(self._buffer.words[2 * n + b]) + REST_PAD
        head = split_layouts(self.layout)[0].record_size(int(self.lengths[b]))  # header + first layer
        size = self.layout.record_size(int(self.lengths[b]))
        return bytes(self._buffer.view[start : start + head]) + bytes(self._rest.view[rest : rest + size - head])


class LayerBatcher(HostBatcher):
    """:class:`cachestore.decode.batch.HostBatcher` for a store whose records split by layer (:func:`split_layouts`:
    HSTU), packing :class:`LayerBatch` es (module docstring); the same arguments, checks and errors."""

    def __init__(self, layout: EntryLayout, **kwargs: Any) -> None:
        super().__init__(layout, **kwargs)
        split = split_layouts(layout)
        if split is None:
            raise ValueError(f"a {layout.arch} store's records do not split by layer (an HSTU store's do)")
        self.split = split
        self._rows = (sum(split[0].row_bytes), sum(layout.row_bytes))  # F, R: bytes per behaviour
        self._rests: list[_Buffer | None] = [None] * self.n_buffers
        self._rest_pid = os.getpid()
        first, whole = self._rows
        self._rest_capacity = self._capacity * (whole - first) // whole  # the later layers' share of the first size

    def _take_rest(self, i: int, min_bytes: int) -> _Buffer:
        """Ring slot i's second buffer (its pending copy finished), at least min_bytes long."""
        if os.getpid() != self._rest_pid:  # forked: never touch the parent's (pinned) buffers
            self._rests, self._rest_pid = [None] * self.n_buffers, os.getpid()
        return ring_slot(self._rests, i, min_bytes, self._rest_capacity, self.pin)

    def _pack(self, ids: np.ndarray, values: Iterable[Any], t0: float) -> LayerBatch:
        """Each value (record bytes or None) split into its two buffers; all headers validated at once."""
        values = list(values)
        n_users = len(ids)
        if len(values) != n_users:
            raise ValueError(f"{len(values)} records for {n_users} user ids")
        sizes = np.fromiter((-1 if v is None else len(v) for v in values), np.int64, n_users)  # -1: cold start
        present = sizes >= 0
        sizes = np.maximum(sizes, 0)
        if (sizes > self._max_record).any():  # a damaged LMDB node size: never copy past the record
            j = int(np.argmax(sizes > self._max_record))
            raise RecordSizeError(f"over-long record: {int(sizes[j])} bytes, the layout allows at most "
                                  f"{self._max_record}", int(ids[j]))
        first, whole = self._rows
        rows = np.maximum(sizes - HEADER_SIZE, 0) // whole  # m_b (a size off the layout fails the checks below)
        head = np.where(present, np.minimum(HEADER_SIZE + rows * first, sizes), 0)  # header + first layer
        zero_at = header_bytes(n_users)
        start = zero_at + self._zero
        a_slots, b_slots = (head + 7) & -8, (sizes - head + 7) & -8  # 8-aligned starts
        a_at = start + np.cumsum(a_slots) - a_slots
        b_at = REST_PAD + np.cumsum(b_slots) - b_slots
        used_a, used_b = start + int(a_slots.sum()), REST_PAD + int(b_slots.sum())
        i = self._next
        buf = self._take_buffer(used_a + 8)
        rest = self._take_rest(i, used_b + 8)
        dst_a, dst_b = buf.view, rest.view
        for value, a, h, b, s in zip(values, a_at.tolist(), head.tolist(), b_at.tolist(), sizes.tolist(), strict=True):
            if value is not None:  # two memcpys straight out of the LMDB map
                dst_a[a : a + h] = value[:h]
                dst_b[b : b + s - h] = value[h:]
        rest.array[:REST_PAD] = 0
        lengths = np.zeros(n_users, dtype=np.int64)
        if present.any():
            a_p, b_p, h_p, s_p = (x[present] for x in (a_at, b_at, head, sizes))
            words = buf.words[(a_p >> 3)[:, None] + _WORDS]  # (P, 4) the 32-byte headers as 4 LE u64
            lengths[present] = self.check_headers(
                ids[present], words, s_p, lambda j: bytes(dst_a[a_p[j] : a_p[j] + h_p[j]])
                + bytes(dst_b[b_p[j] : b_p[j] + s_p[j] - h_p[j]]))
        offsets = np.where(present, a_at, zero_at)
        rest_offsets = np.where(present, b_at - REST_PAD, 0)
        arr = buf.array
        arr[0:zero_at].view(np.int64)[:] = np.concatenate([offsets, lengths, rest_offsets, lengths])
        arr[zero_at:start] = 0
        return LayerBatch(
            layout=self.layout, user_ids=ids, lengths=arr[8 * n_users : 16 * n_users].view(np.int64),
            offsets=arr[0 : 8 * n_users].view(np.int64), present=present, cold_start=int((~present).sum()),
            max_length=int(lengths.max()) if n_users else 0, used_bytes=used_a, record_bytes=int(sizes.sum()),
            zero_offset=zero_at, fetch_seconds=time.perf_counter() - t0, pinned=self.pin, _buffer=buf,
            _generation=buf.generation, rest_bytes=used_b, _rest=rest, _rest_generation=rest.generation)
