"""Zero-copy fetch: the GPU gathers the records straight out of the LMDB map; the CPU only looks them up.

Why: :meth:`cachestore.decode.batch.HostBatcher.fetch` copies every record into a pinned buffer on one CPU core.
At B = 512, L = 1,000 that is 4 MB of random 8 KB reads, bound by the core's memory bandwidth: an H100
host's core did the 512 ``get``s in 0.54 ms and a bare copy of 512 random 8 KB slices in 0.78 ms.
Here the CPU does the lookups and writes a small
table instead; the GPU reads the records over PCIe from the page cache itself.

How:

- :class:`StoreMap` — the read-only LMDB map of one store version in this process: located in
  ``/proc/self/maps`` by the data file's device and inode (py-lmdb does not expose the map's address),
  viewed as a read-only numpy array, and on CUDA registered once with ``cudaHostRegister`` (read-only,
  mapped), which pins the file's page-cache pages (``StoreMap.nbytes`` of host memory, shared with other
  processes that map the same file) so the GPU can read them. A published version is never written
  (:mod:`cachestore.store.publish`), so an address stays valid for as long as the environment is open.
- :class:`MappedBatcher` — :meth:`fetch` looks the users up in one read transaction (``buffers=True``:
  values are views of the map), takes their addresses (:func:`value_addresses`), checks all headers at
  once from the map (the same checks as ``HostBatcher``, :meth:`HostBatcher.check_headers`) and writes a
  :class:`MappedBatch`: a pinned buffer of 5·B int64 ``[offsets | lengths | src | dst | units]``.
  offsets/lengths are the device batch's header (the byte layout of :mod:`cachestore.decode.batch`: records
  start 8-aligned after the zero block at 16·B); row b of src/dst/units says "copy ``units`` words of
  ``unit`` bytes from map word ``src`` to batch word ``dst``" (units 0 for a cold-start slot).
- :func:`gather_records` — fills a device buffer with that batch: the header copied from the pinned
  buffer, the records gathered from the map by a Triton kernel (one program per user) on CUDA, by
  numpy slices elsewhere (:func:`gather_reference`, the reference the tests compare with). The result
  is byte-identical to ``HostBatcher.fetch`` + a copy, so unpack, the fused kernel and
  :class:`cachestore.decode.graphs.GraphedDecoder` (which captures the gather in its graph) are unchanged.

A record's address is read from the memoryview py-lmdb returns. The fast way reads the ``buf`` field of
CPython's memoryview object (its offset found at import by probing a known buffer); every batch is then
checked: all addresses inside the map and the first equal to numpy's own reading of that view, else the
slow exact way (numpy per value) is used. A wrong address cannot be used silently either way: every
header read at it must match the layout.
"""

from __future__ import annotations

import ctypes
import itertools
import operator
import os
import struct
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import FetchedBatch, HostBatcher, zero_block_bytes
from collectivekv.cachestore.decode.fused import ALL_BYTES
from collectivekv.cachestore.store.record import KEY
from collectivekv.cachestore.store.store_check import StoreDamagedError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

if TYPE_CHECKING:
    from collectivekv.cachestore.store.entry import EntryLayout
    from collectivekv.cachestore.store.reader import StoreReader

_HEADER = np.arange(32, dtype=np.int64)  # the 32 header bytes of a record
_WORDS = np.arange(4, dtype=np.int64)  # the same as 4 uint64 words
_REGISTER_FLAGS = 0x08 | 0x02  # cudaHostRegisterReadOnly | cudaHostRegisterMapped
_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # gather word per unit (bytes)
_UNIT_NUMPY = {8: np.int64, 4: np.int32, 2: np.int16, 1: np.uint8}  # the same words as numpy dtypes


def _probe_buf_offset() -> int | None:
    """Byte offset of ``Py_buffer.buf`` inside a CPython memoryview object, or None if not found."""
    probe = bytearray(64)
    view = memoryview(probe)
    addr = np.frombuffer(probe, np.uint8).ctypes.data
    words = struct.unpack("16Q", ctypes.string_at(id(view), 128))
    return 8 * words.index(addr) if words.count(addr) == 1 else None


_BUF_OFFSET = _probe_buf_offset()


class _Memory:
    """Process memory as a numpy array (no copy, no ctypes type per call): ``np.asarray(_Memory(...))``."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str, readonly: bool) -> None:
        self.__array_interface__ = {"data": (address, readonly), "shape": shape, "typestr": typestr, "version": 3}


def _words_at(address: int, n: int) -> np.ndarray:
    """n int64 words of this process's memory from ``address`` (read-only view)."""
    return np.asarray(_Memory(address, (n,), "<i8", True))


def _exact_addresses(values: Sequence[memoryview]) -> np.ndarray:
    return np.fromiter((np.frombuffer(v, np.uint8).ctypes.data for v in values), np.int64, len(values))


def value_addresses(values: Sequence[memoryview], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Start addresses and sizes, (P,) int64 each, of memoryviews ``values`` that must lie in [lo, hi).

    Fast path (one vectorised read of the memoryview objects' ``buf`` fields), checked as the module
    docstring says; raises ValueError if a value is outside [lo, hi) by the exact reading too."""
    sizes = np.fromiter(map(len, values), np.int64, len(values))
    if not values:
        return sizes, sizes
    if _BUF_OFFSET is not None:
        ids = np.fromiter(map(id, values), np.int64, len(values))
        first = int(ids.min())
        span = int(ids.max()) - first + _BUF_OFFSET + 8
        objects = _words_at(first, span // 8 + 1)
        addr = objects[(ids - first + _BUF_OFFSET) >> 3]
        if ((addr >= lo) & (addr + sizes <= hi)).all() and int(addr[0]) == int(_exact_addresses(values[:1])[0]):
            return addr, sizes
    addr = _exact_addresses(values)
    if not ((addr >= lo) & (addr + sizes <= hi)).all():
        raise ValueError("an LMDB value lies outside the store's map: is the environment the one StoreMap located?")
    return addr, sizes


class StoreMap:
    """The LMDB map of a reader's store version in this process (see the module docstring)."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        self._pid: int | None = None
        self._registered: int | None = None  # base address registered with CUDA

    def _locate(self) -> None:
        self.close()  # a map registered earlier in this process (the reader was reopened) is let go
        env = self.reader._environment()  # (re)opened in this process
        path = self.reader.version_dir / "lmdb" / "data.mdb"
        st = os.stat(path)
        base = None
        with open("/proc/self/maps") as maps:
            for line in maps:  # address perms offset dev inode [path]
                fields = line.split()
                if len(fields) >= 5 and int(fields[4]) == st.st_ino and int(fields[2], 16) == 0:
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    if os.makedev(major, minor) == st.st_dev:
                        base = int(fields[0].split("-")[0], 16)
                        break
        if base is None:
            raise RuntimeError(f"the LMDB map of {path} is not in /proc/self/maps (zero-copy fetch needs Linux)")
        self._env, self._pid, self._base, self._nbytes = env, os.getpid(), base, st.st_size  # file pages only
        self._array = np.asarray(_Memory(base, (self._nbytes,), "|u1", True))  # read-only, no copy
        self._words = self._array[: self._nbytes // 8 * 8].view("<u8")

    def _current(self) -> None:
        if self._pid != os.getpid() or self.reader._environment() is not self._env:
            self._locate()

    @property
    def base(self) -> int:
        """Address of the map (of the file's first byte) in this process."""
        self._current()
        return self._base

    @property
    def nbytes(self) -> int:
        """Bytes of the map that hold the file (what registering pins)."""
        self._current()
        return self._nbytes

    @property
    def array(self) -> np.ndarray:
        """The map's file bytes as a read-only uint8 array (no copy)."""
        self._current()
        return self._array

    def source(self, unit: int, device: torch.device) -> Any:
        """What the gather kernel reads, as words of ``unit`` bytes: on CUDA the registered map (registered
        on first use), elsewhere a CPU tensor over it."""
        self._current()
        dtype = _UNIT_DTYPES[unit]
        if device.type != "cuda":
            with warnings.catch_warnings():  # read-only memory: the kernel only loads from it
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(self._array.view(_UNIT_NUMPY[unit]))
        if self._registered != self._base:
            err = torch.cuda.cudart().cudaHostRegister(self._base, self._nbytes, _REGISTER_FLAGS)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the LMDB map ({self._nbytes} bytes) failed: {err}")
            self._registered = self._base
        return _HostPointer(self._base, dtype)

    def close(self) -> None:
        """Unregister the map from CUDA (this process); the reader stays open."""
        if self._registered is not None and self._pid == os.getpid():
            torch.cuda.cudart().cudaHostUnregister(self._registered)
        self._registered = None


@dataclass
class _HostPointer:
    """A pointer Triton can take as a kernel argument: registered host memory, read by the GPU over PCIe."""

    address: int
    dtype: torch.dtype

    def data_ptr(self) -> int:
        return self.address


@dataclass
class MappedBatch(FetchedBatch):
    """A zero-copy batch: the device batch's header and the gather table in a pinned buffer (5·B int64:
    offsets | lengths | src | dst | units), the records still in the map. ``used_bytes`` is the device
    batch's size; ``unit`` the gather word (bytes: 8, 4, 2 or 1, the largest dividing every record's map
    offset); ``store_map`` the map the records are in."""

    unit: int
    store_map: StoreMap = field(repr=False)

    @property
    def pcie_bytes(self) -> int:
        """Bytes this batch moves host → device: the pinned header and table (40·B) and the records."""
        return 40 * self.n_users + self.record_bytes

    @property
    def table(self) -> np.ndarray:
        """(3, B) int64: src, dst, units per user (a view of the pinned buffer)."""
        b = self.n_users
        return self._buffer.array[16 * b : 40 * b].view(np.int64).reshape(3, b)  # (3, B)


class MappedBatcher:
    """Zero-copy fetches of a store version: lookups + a gather table on the CPU (module docstring).

    Takes :class:`cachestore.decode.batch.HostBatcher`'s arguments (its ring of ``n_buffers`` pinned buffers holds
    the 40·B-byte tables here; its header checks are used as they are)."""

    def __init__(self, layout: EntryLayout, *, reader: StoreReader, expected_model_version: str | None = None,
                 pin: bool | None = None, n_buffers: int = 2, batch_users: int = 512, verify_crc: bool = False) -> None:
        self.checks = HostBatcher(layout, reader=reader, expected_model_version=expected_model_version, pin=pin,
                                  n_buffers=n_buffers, batch_users=batch_users, capacity_bytes=40 * batch_users,
                                  verify_crc=verify_crc)
        self.layout, self.reader, self.pin = layout, reader, self.checks.pin
        self.store_map = StoreMap(reader)
        self._zero = zero_block_bytes(layout)

    def fetch(self, user_ids: Sequence[int] | np.ndarray, n_slots: int | None = None) -> MappedBatch:
        """Look these users up (one read transaction) and write the batch's header and gather table;
        absent users (and ``n_slots`` padding, user id -1) are cold-start slots, as in ``HostBatcher.fetch``."""
        t0 = time.perf_counter()
        ids = self.checks._ids(user_ids)
        pad = 0 if n_slots is None else n_slots - len(ids)
        if pad < 0:
            raise ValueError(f"{len(ids)} users do not fit n_slots={n_slots}")
        smap = self.store_map
        smap._current()
        with self.reader.reading(ids.tolist()), smap._env.begin(buffers=True) as txn:  # lmdb.Error -> StoreDamagedError
            values = list(map(txn.get, map(KEY.pack, ids.tolist())))
        if pad:
            ids = np.concatenate([ids, np.full(pad, -1, dtype=np.int64)])
            values += [None] * pad
        return self._table(ids, values, t0)

    def _table(self, ids: np.ndarray, values: list[memoryview | None], t0: float) -> MappedBatch:
        b = len(ids)
        buf = self.checks._take_buffer(40 * b)
        head = buf.array[: 40 * b].view(np.int64).reshape(5, b)  # (5, B) offsets, lengths, src, dst, units
        # (not ``None in values``: comparing a memoryview with None raises and clears an error each time)
        present = np.fromiter(map(operator.is_not, values, itertools.repeat(None)), bool, b)
        found = values if present.all() else list(itertools.compress(values, present))
        smap = self.store_map
        base = smap.base
        try:
            src, sizes = value_addresses(found, base, base + smap._nbytes)
        except ValueError as exc:  # a damaged node size or page: the value would run past the file
            raise StoreDamagedError(self.reader.version_dir, str(exc)) from None
        src -= base  # (P,) offsets in the map
        unit = 8
        while unit > 1 and (src % unit).any():
            unit //= 2
        array = smap._array
        words = (smap._words[(src >> 3)[:, None] + _WORDS] if unit == 8  # the headers as (P, 4) LE uint64
                 else array[src[:, None] + _HEADER].view("<u8"))
        lengths = np.zeros(b, np.int64)
        lengths[present] = self.checks.check_headers(ids[present], words, sizes,
                                                     lambda j: array[int(src[j]) : int(src[j] + sizes[j])])
        start = 16 * b + self._zero
        slots = (sizes + 7) & -8  # each record 8-aligned in the device batch
        dst = start + np.cumsum(slots) - slots  # (P,)
        at = np.flatnonzero(present)  # (P,) slots of the present users
        head[0], head[1], head[2:] = 16 * b, lengths, 0  # cold start: the zero block, length 0, nothing to gather
        head[0, at], head[2, at], head[3, at], head[4, at] = dst, src // unit, dst // unit, (sizes + unit - 1) // unit
        return MappedBatch(
            layout=self.layout, user_ids=ids, lengths=head[1], offsets=head[0], present=present,
            cold_start=b - len(found), max_length=int(lengths.max()) if b else 0,
            used_bytes=int(start + slots.sum()), record_bytes=int(sizes.sum()), zero_offset=16 * b,
            fetch_seconds=time.perf_counter() - t0, pinned=self.pin, unit=unit, store_map=smap, _buffer=buf,
            _generation=buf.generation)

    def close(self) -> None:
        self.store_map.close()


def gather_reference(batch: MappedBatch, raw: torch.Tensor) -> None:
    """Fill ``raw`` (uint8 CPU tensor, >= used_bytes) with the batch: the math :func:`gather_records` runs."""
    batch.check_valid()
    b, unit = batch.n_users, batch.unit
    out = raw.numpy()
    out[: 16 * b] = batch.buffer.numpy()[: 16 * b]
    out[16 * b : batch.zero_offset + zero_block_bytes(batch.layout)] = 0
    array = batch.store_map.array
    for s, d, n in batch.table.T[batch.present].tolist():
        out[d * unit : (d + n) * unit] = array[s * unit : (s + n) * unit]


def gather_records(batch: MappedBatch, raw: torch.Tensor, table: torch.Tensor | None = None,
                   max_length: int | None = None, pieces: Sequence[tuple[int, int]] = ALL_BYTES,
                   on_piece: Callable[[int], None] | None = None) -> None:
    """Fill ``raw`` (uint8, on the batch's device, >= used_bytes, its zero block at 16·B already zero on
    CUDA) with the batch, on the current stream: the header copied from the pinned buffer, the records
    gathered from the map (CUDA: Triton kernel over the registered map; ``table`` (3, B) int64 on the device
    as staging for the gather table, allocated when None; CPU: :func:`gather_reference`). Inside a CUDA
    graph capture pass a static ``table`` and the graph's ``max_length`` (default: the batch's); the capture
    records the map's and the pinned buffer's addresses. CUDA: one gather launch per byte range of
    ``pieces`` (records ending in it), each followed by ``on_piece(i)`` (e.g. recording an event)."""
    if raw.device.type != "cuda":
        gather_reference(batch, raw)
        return
    b = batch.n_users
    host = batch.buffer
    raw[: 16 * b].copy_(host[: 16 * b], non_blocking=True)
    if table is None:
        table = torch.empty(3, b, dtype=torch.int64, device=raw.device)
    table.view(-1).view(torch.uint8).copy_(host[16 * b : 40 * b], non_blocking=True)
    longest = batch.layout.record_size(batch.max_length if max_length is None else max_length)
    source = batch.store_map.source(batch.unit, raw.device)
    for i, ends in enumerate(pieces):
        launch_gather(source, table, raw, batch.unit, longest, ends)
        if on_piece is not None:
            on_piece(i)


_BLOCK = 1024  # words per loop step of a gather program (1024 x 8 B: 0.108 ms for 4 MB on an H100, as a DMA copy)

if triton is not None:

    @triton.jit
    def _gather_kernel(src_ptr, table_ptr, dst_ptr, B, end_lo, end_hi, UNIT: tl.constexpr, STEPS: tl.constexpr,
                       BLOCK: tl.constexpr):
        """Program r copies table[2, r] (<= STEPS·BLOCK) words from src[table[0, r]:] to dst[table[1, r]:]
        if that record ends in bytes (end_lo, end_hi] of dst (a static loop bound: Triton's CPU interpreter
        cannot loop to a loaded one)."""
        r = tl.program_id(0)
        s = tl.load(table_ptr + r)
        d = tl.load(table_ptr + B + r)
        n = tl.load(table_ptr + 2 * B + r)
        end = (d + n) * UNIT
        n = tl.where((end > end_lo) & (end <= end_hi), n, 0)
        for c in range(0, STEPS):
            o = c * BLOCK + tl.arange(0, BLOCK)
            m = o < n
            tl.store(dst_ptr + d + o, tl.load(src_ptr + s + o, mask=m), mask=m)


def launch_gather(source: Any, table: torch.Tensor, raw: torch.Tensor, unit: int, max_bytes: int,
                  ends: tuple[int, int] = ALL_BYTES[0]) -> None:
    """The gather kernel: ``source`` (:meth:`StoreMap.source`) words of ``unit`` bytes → ``raw`` (uint8),
    one program per column of ``table`` (3, B) int64 (src, dst, units; on raw's device); no record longer
    than ``max_bytes`` (a bound fixed per CUDA graph: the record size at its padded length). ``ends``:
    only the records ending in bytes (lo, hi] of raw — with 8-aligned cuts the same users the fused
    kernel's launch for that range serves (a record's end rounded up to ``unit`` crosses no such cut)."""
    if triton is None:
        raise RuntimeError("the zero-copy gather needs Triton (pip install triton)")
    dtype = _UNIT_DTYPES[unit]
    dst = raw[: raw.numel() // unit * unit].view(dtype)
    b = table.shape[1]
    if b:
        steps = max(1, -(-max_bytes // (unit * _BLOCK)))  # loop steps of the longest record (one compile per count)
        _gather_kernel[(b,)](source, table, dst, b, ends[0], ends[1], UNIT=unit, STEPS=steps, BLOCK=_BLOCK,
                             num_warps=4)
