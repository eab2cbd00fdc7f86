"""Batched reads of user cache records into reusable host buffers (pinned where there is a GPU).

One batch is ONE contiguous byte buffer, so that a single host→device copy moves all of it
(layout "jagged records"; offsets in bytes from the start of the buffer, B = users in the batch):

    offset          size        content
    0               8·B         offsets  int64[B]  start of user b's record (cold start: the zero block)
    8·B             8·B         lengths  int64[B]  behaviours n_b of user b (0 for cold start)
    16·B            Z           zero block: Z zero bytes, Z = max(8, widest per-behaviour part) rounded up to 8
    16·B + Z        ...         the records of the present users in request order, each the LMDB value verbatim
                                (32-byte header + payload, docs/store_format.md), each start aligned to 8 bytes
    used_bytes                  end of the last record, rounded up to 8

Jagged rather than padded: the copy moves only the bytes users have (padding to max_len would move
up to 20x more at L = 1000 for typical length mixes), and packing is one memcpy per user straight out
of the LMDB map. The device unpacks the parts into padded (B, L) tensors in a few gathers
(:func:`cachestore.decode.transfer.unpack_entry`); padding positions read the zero block (values 0, index 0).

Hot path (:meth:`HostBatcher.fetch`): one LMDB read transaction with ``buffers=True`` (values are
views of the map, no bytes objects), one memoryview copy per present user, and then *vectorised*
validation of all headers at once: every record of a store shares its layout, so header bytes 0..11
and 16..27 must equal ``layout.header_parts`` (magic, format version, dtype codes, part count,
parts CRC, model version) and the size must equal ``layout.record_size(n)``. A record that fails is
decoded by :func:`cachestore.store.entry.decode_entry`, which raises the precise error (e.g.
``ModelVersionMismatchError`` naming the user). CRCs are not checked by default (the store is
immutable and verified when built; ``verify_crc=True`` checks every record).

Buffers are reused: a batcher owns a ring of ``n_buffers`` buffers (default 2, so fetching batch i+1
overlaps the transfer of batch i); a :class:`HostBatch` stays valid until its buffer comes round again
(``n_buffers`` fetches later; using it after that raises). Reuse waits for the buffer's pending
host→device copy. Buffers grow (geometrically) when a batch needs more room; they are allocated in
the process that uses them (re-created after fork: CUDA and pinned memory do not cross fork()).

This module needs no ``lmdb`` (only :meth:`HostBatcher.fetch` uses a :class:`StoreReader`), so the
GPU benchmark can pack synthetic records with :meth:`HostBatcher.pack`.
"""

from __future__ import annotations

import itertools
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from collectivekv.cachestore.store.entry import EntryLayout, check_indices, decode_entry
from collectivekv.cachestore.store.record import (
    HEADER_SIZE,
    IDX_DTYPES,
    KEY,
    ModelVersionMismatchError,
    RecordError,
    RecordSizeError,
)

if TYPE_CHECKING:
    from collectivekv.cachestore.store.reader import StoreReader

_ALIGN = 8
_WORDS = np.arange(HEADER_SIZE // 8, dtype=np.int64)  # a record header as 4 little-endian uint64 words


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def pinned_available() -> bool:
    """Pinned (page-locked) host memory needs a CUDA device; without one buffers are plain memory."""
    return torch.cuda.is_available()


def zero_block_bytes(layout: EntryLayout) -> int:
    """Size of the zero block: the widest row of any part in bytes (>= 8), rounded up to 8."""
    return _align(max(8, *layout.row_bytes))


def check_record(layout: EntryLayout, buf: bytes | memoryview, expected_model_version: str | None,
                 user_id: int | None) -> None:
    """Fully validate one record of ``layout`` (CRC included, router indices < pool size) with ``decode_entry``;
    raises the precise ``RecordError`` subclass naming the user."""
    record = decode_entry(layout, buf, expected_model_version=expected_model_version, user_id=user_id)
    check_indices(layout, record, user_id)


@dataclass
class _Buffer:
    tensor: torch.Tensor  # uint8 (capacity,), pinned or not
    array: np.ndarray  # numpy view of tensor
    view: memoryview  # writable memoryview of array
    words: np.ndarray  # the same bytes as little-endian uint64 (records start 8-aligned)
    generation: int = 0  # bumped every time the buffer is (re)filled
    pending: Any = None  # torch.cuda.Event of the last copy out of this buffer, or None

    @classmethod
    def allocate(cls, nbytes: int, pin: bool) -> _Buffer:
        t = torch.empty(_align(max(nbytes, _ALIGN)), dtype=torch.uint8, pin_memory=pin)
        a = t.numpy()
        return cls(t, a, memoryview(a), a.view("<u8"))

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None


def ring_slot(ring: list[_Buffer | None], i: int, min_bytes: int, first_size: int, pin: bool) -> _Buffer:
    """Ring slot i after its pending copy, >= min_bytes (new: first_size, then doubling), its generation bumped."""
    buf = ring[i]
    if buf is not None:
        buf.wait()
    if buf is None or len(buf.array) < min_bytes:
        generation = 0 if buf is None else buf.generation
        buf = ring[i] = _Buffer.allocate(max(min_bytes, first_size if buf is None else 2 * len(buf.array)), pin)
        buf.generation = generation
    buf.generation += 1
    return buf


@dataclass
class FetchedBatch:
    """What a fetch of B users gives, wherever the records are (see the module docstring for the byte layout).

    user_ids: (B,) int64 as requested; lengths, offsets: (B,) int64 numpy views of the buffer (offsets into
    the batch as the device receives it); present: (B,) bool (False = cold start: absent from the store);
    cold_start: number of absent users; max_length: max(lengths) (0 if none); used_bytes: bytes of the batch
    on the device; record_bytes: sum of the records' sizes; fetch_seconds: wall time of the fetch on the CPU.
    Valid until its host buffer comes round again (``n_buffers`` fetches later).
    """

    layout: EntryLayout
    user_ids: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    present: np.ndarray
    cold_start: int
    max_length: int
    used_bytes: int
    record_bytes: int
    zero_offset: int
    fetch_seconds: float
    pinned: bool
    _buffer: _Buffer = field(repr=False)
    _generation: int = field(repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def check_valid(self) -> None:
        """Raise if the buffer has since been refilled by a later fetch (the batch is stale)."""
        if self._buffer.generation != self._generation:
            raise RuntimeError(f"{type(self).__name__} is stale: its buffer was reused by a later fetch "
                               "(a batch is valid for n_buffers - 1 further fetches)")

    @property
    def buffer(self) -> torch.Tensor:
        """uint8 view of the WHOLE host buffer (the batch is its prefix; the rest is left over from earlier
        batches): a fixed source for copies captured in CUDA graphs (cachestore.decode.graphs)."""
        self.check_valid()
        return self._buffer.tensor

    def mark_copied(self, event: Any) -> None:
        """Record the CUDA event after which the buffer may be overwritten (the copy out of it is done)."""
        self._buffer.pending = event


@dataclass
class HostBatch(FetchedBatch):
    """A packed batch: the whole batch (header, zero block, records) in the host buffer's used_bytes prefix,
    what one host→device copy moves."""

    @property
    def tensor(self) -> torch.Tensor:
        """uint8 (used_bytes,) view of the buffer: what one host→device copy moves."""
        self.check_valid()
        return self._buffer.tensor[: self.used_bytes]

    def record(self, b: int) -> memoryview | None:
        """The raw record bytes of user b (a view of the buffer), or None for a cold-start user."""
        self.check_valid()
        if not self.present[b]:
            return None
        start = int(self.offsets[b])
        return self._buffer.view[start : start + self.layout.record_size(int(self.lengths[b]))]


class RecordFetch(Protocol):
    """What the runtime needs of a fetch: the store's layout, one batch of users' records per call (absent
    users as cold-start slots, padded to ``n_slots``), and release of what it holds. Two implementations:
    :class:`HostBatcher` (the records copied into a pinned buffer, one host-to-device copy) and
    :class:`cachestore.decode.mapped.MappedBatcher` (a gather table over the store's registered map)."""

    layout: EntryLayout

    def fetch(self, user_ids: Sequence[int] | np.ndarray, n_slots: int | None = None) -> Any: ...

    def close(self) -> None: ...


class HostBatcher:
    """Packs batches of user records into a ring of reusable host buffers.

    layout: the store's EntryLayout. expected_model_version: the loaded
    checkpoint's version (default: the layout's); a store whose layout carries another version is
    refused here, a record that carries another version is refused by :meth:`fetch` / :meth:`pack` —
    both raise ``ModelVersionMismatchError``. reader: the store to :meth:`fetch` from (optional for :meth:`pack`).
    pin: pinned buffers (default: when CUDA is available). capacity_bytes: initial size of each buffer
    (default: room for ``batch_users`` users of ``min(max_len, 1000)`` behaviours, at most 64 MiB).
    """

    def __init__(self, layout: EntryLayout, *, reader: StoreReader | None = None,
                 expected_model_version: str | None = None, pin: bool | None = None, n_buffers: int = 2,
                 batch_users: int = 512, capacity_bytes: int | None = None, verify_crc: bool = False) -> None:
        if reader is not None and reader.layout != layout:
            raise ValueError(f"reader layout {reader.layout} differs from the batcher's {layout}")
        expected = expected_model_version or layout.model_version
        if layout.model_version != expected:
            raise ModelVersionMismatchError(
                f"store was built by model version {layout.model_version}, but model version {expected} is "
                "loaded: load the checkpoint the store was prefilled with, or prefill and publish a new store")
        if n_buffers < 1:
            raise ValueError("n_buffers must be >= 1")
        self.layout = layout
        self.reader = reader
        self.expected_model_version = expected
        self.pin = pinned_available() if pin is None else bool(pin)
        self.n_buffers = n_buffers
        self.verify_crc = verify_crc
        pre, post = layout.header_parts  # header bytes 0..11 and 16..27, the same in every record
        self._expect = (np.frombuffer(pre[:8], "<u8")[0], np.uint64(np.frombuffer(pre[8:], "<u4")[0]),
                        np.frombuffer(post[:8], "<u8")[0], np.uint64(np.frombuffer(post[8:], "<u4")[0]))
        self._zero = zero_block_bytes(layout)
        self._max_record = layout.record_size(layout.max_len)
        if capacity_bytes is None:
            capacity_bytes = min(64 << 20, batch_users * (16 + _align(layout.record_size(min(layout.max_len, 1000)))))
        self._capacity = int(capacity_bytes) + self._zero
        self._buffers: list[_Buffer | None] = [None] * n_buffers
        self._next = 0
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------- buffers
    def _take_buffer(self, min_bytes: int) -> _Buffer:
        """The next buffer of the ring (after its pending copy finished), at least min_bytes long."""
        if os.getpid() != self._pid:  # forked: never touch the parent's (pinned) buffers
            self._buffers, self._pid = [None] * self.n_buffers, os.getpid()
        i, self._next = self._next, (self._next + 1) % self.n_buffers
        return ring_slot(self._buffers, i, min_bytes, self._capacity, self.pin)

    def _grow(self, buf: _Buffer, need: int, keep: int) -> _Buffer:
        """Replace buf (in the ring) by one of >= need bytes holding its first `keep` bytes."""
        new = _Buffer.allocate(max(need, 2 * len(buf.array)), self.pin)
        new.array[:keep] = buf.array[:keep]
        new.generation = buf.generation
        i = next(j for j, b in enumerate(self._buffers) if b is buf)
        self._buffers[i] = new
        return new

    # ---------------------------------------------------------------------------------- pack
    def _ids(self, user_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(user_ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"user ids must be a 1-d integer sequence, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and int(ids.min()) < 0:
            raise RecordError(f"user id must be >= 0, got {int(ids.min())}")
        return ids

    def _pack(self, ids: np.ndarray, values: Iterable[Any], t0: float) -> HostBatch:
        """Copy each value (record bytes or None) into a buffer; validate all headers at once."""
        n_users = len(ids)
        zero_at = 16 * n_users
        start = zero_at + self._zero
        buf = self._take_buffer(start + _ALIGN)
        cap, dst = len(buf.array), buf.view
        offs: list[int] = []
        sizes: list[int] = []
        add_off, add_size = offs.append, sizes.append
        pos = start
        for value in values:  # per user: one view of the LMDB map, one memcpy (no other objects)
            if value is None:
                add_off(-1)
                add_size(0)
                continue
            n = len(value)
            if n > self._max_record:  # a damaged LMDB node size: never copy past the record
                raise RecordSizeError(f"over-long record: {n} bytes, the layout allows at most {self._max_record}",
                                      int(ids[len(offs)]))
            end = pos + n
            nxt = (end + 7) & -8  # next record starts 8-aligned (_ALIGN)
            if nxt > cap:
                buf = self._grow(buf, nxt + (nxt >> 1), pos)
                cap, dst = len(buf.array), buf.view
            dst[pos:end] = value
            add_off(pos)
            add_size(n)
            pos = nxt
        if len(offs) != n_users:
            raise ValueError(f"{len(offs)} records for {n_users} user ids")
        arr = buf.array
        offsets = np.array(offs, dtype=np.int64)
        size = np.array(sizes, dtype=np.int64)
        present = offsets >= 0
        lengths = np.zeros(n_users, dtype=np.int64)
        if present.any():
            everyone = bool(present.all())
            at = offsets if everyone else offsets[present]
            size_p = size if everyone else size[present]
            words = buf.words[(at >> 3)[:, None] + _WORDS]  # (P, 4) the 32-byte headers as 4 LE u64
            lengths[present] = self.check_headers(ids[present], words, size_p,
                                                  lambda j: buf.view[int(at[j]) : int(at[j] + size_p[j])])
        offsets[~present] = zero_at
        used = pos
        arr[0:zero_at].view(np.int64)[:] = np.concatenate([offsets, lengths])
        arr[zero_at:start] = 0
        return HostBatch(
            layout=self.layout, user_ids=ids, lengths=arr[8 * n_users : zero_at].view(np.int64),
            offsets=arr[0 : 8 * n_users].view(np.int64), present=present, cold_start=int((~present).sum()),
            max_length=int(lengths.max()) if n_users else 0, used_bytes=used, record_bytes=int(size.sum()),
            zero_offset=zero_at, fetch_seconds=time.perf_counter() - t0, pinned=self.pin, _buffer=buf,
            _generation=buf.generation)

    def check_headers(self, ids: np.ndarray, words: np.ndarray, sizes: np.ndarray,
                      record: Callable[[int], bytes | memoryview]) -> np.ndarray:
        """Lengths n (P,) int64 of P present records, checked all at once from their headers ``words``
        (P, 4) (the 32 header bytes as little-endian uint64) and ``sizes`` (P,) against this batcher's layout;
        ``record(j)`` gives record j's bytes (read only for the precise error, or for every record with
        ``verify_crc``). Raises the ``RecordError`` subclass naming the user of the first bad record."""
        n = (words[:, 1] >> np.uint64(32)).astype(np.int64)  # header bytes 12..15: length
        low = np.uint64(0xFFFFFFFF)
        w0, w1, w2, w3 = self._expect  # header bytes 0..7, 8..11, 16..23, 24..27 of this layout
        ok = (words[:, 0] == w0) & ((words[:, 1] & low) == w1) & (words[:, 2] == w2) & ((words[:, 3] & low) == w3)
        ok &= (sizes == self.layout.record_sizes(n)) & (n <= self.layout.max_len)
        if not ok.all():
            j = int(np.flatnonzero(~ok)[0])
            uid, rec = int(ids[j]), bytes(record(j))
            check_record(self.layout, rec, self.expected_model_version, uid)  # raises if invalid
            raise RecordError(f"record does not match the store layout {self.layout} (header "
                              f"{rec[:HEADER_SIZE].hex()}, {len(rec)} bytes)", uid)
        if self.verify_crc:
            self._verify_payloads(ids, words, n, record)
        return n

    def _verify_payloads(self, ids: np.ndarray, words: np.ndarray, n: np.ndarray,
                         record: Callable[[int], bytes | memoryview]) -> None:
        """``verify_crc``: per record one ``zlib.crc32`` against the header's (bytes 28..31) and, for a one-group
        (din) layout with shared sides, its router indices (the record's tail) against the pool; a record that
        fails goes through the full decoder for the precise error naming the user. Other layouts: the full
        decoder."""
        layout, g = self.layout, self.layout.flat_group
        if g is None:
            for j, uid in enumerate(ids.tolist()):
                check_record(layout, record(j), self.expected_model_version, uid)
            return
        crcs = (words[:, 3] >> np.uint64(32)).tolist()
        idx_dt = IDX_DTYPES[layout.idx_dtype][1] if layout.idx_dtype else None
        sides = sum(p.kind == "idx" for p in layout.parts)  # k_idx and v_idx, or one joint kv_idx
        for j, (length, crc) in enumerate(zip(n.tolist(), crcs, strict=True)):
            rec = record(j)
            ok = zlib.crc32(rec[:28], zlib.crc32(rec[HEADER_SIZE:])) == crc
            if ok and idx_dt is not None and length:
                count = sides * length  # the index parts end the record
                idx = np.frombuffer(rec, idx_dt, count=count, offset=len(rec) - count * idx_dt.itemsize)
                ok = int(idx.max()) < layout.pool_size and (idx_dt.kind == "u" or int(idx.min()) >= 0)
            if not ok:  # the full decoder raises the precise error (it is the authority on a record)
                check_record(layout, rec, self.expected_model_version, int(ids[j]))

    def pack(self, user_ids: Sequence[int] | np.ndarray, records: Iterable[bytes | memoryview | None]) -> HostBatch:
        """Pack given encoded records (None = cold start) for these user ids; no LMDB involved."""
        t0 = time.perf_counter()
        return self._pack(self._ids(user_ids), records, t0)

    def close(self) -> None:
        """Nothing to release (the buffers are freed with the batcher; the reader belongs to the caller)."""

    def fetch(self, user_ids: Sequence[int] | np.ndarray, n_slots: int | None = None) -> HostBatch:
        """Read these users' records from the store into the next buffer (one read transaction).

        Users absent from the store become cold-start slots (length 0); never an exception.
        n_slots: pad the batch with cold-start slots (user id -1, not looked up) to this many users
        (a fixed batch size for CUDA graphs, ``cachestore.decode.graphs``); they count in ``cold_start``."""
        if self.reader is None:
            raise ValueError("this HostBatcher has no StoreReader: use pack(), or pass reader=")
        t0 = time.perf_counter()
        ids = self._ids(user_ids)
        keys = list(map(KEY.pack, ids.tolist()))
        pad = 0 if n_slots is None else n_slots - len(ids)
        if pad < 0:
            raise ValueError(f"{len(ids)} users do not fit n_slots={n_slots}")
        env = self.reader._environment()  # opened in this process (reopened after fork), read-only, lock-free
        with self.reader.reading(ids.tolist()), env.begin(buffers=True) as txn:  # lmdb.Error -> StoreDamagedError
            values = map(txn.get, keys)
            if pad:
                ids = np.concatenate([ids, np.full(pad, -1, dtype=np.int64)])
                values = itertools.chain(values, itertools.repeat(None, pad))
            return self._pack(ids, values, t0)
