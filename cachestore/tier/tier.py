"""The resident tier: a store version's records held on the serving device, found by user id there.

Two modes, chosen from the capacity (``tier_bytes``) when the tier is opened (:func:`plan_capacity`):

- **whole store** — the store's data file fits: every record is loaded once at open (headers and CRC
  checked, :meth:`ResidentTier._load_whole`), packed in key order, with the sorted key array on the
  device. A batch's ids are looked up on the device (:func:`cachestore.tier.arena.lookup`): the host
  does nothing per user, no record crosses PCIe, and an absent user is a cold start. No eviction.
- **cache** — the store is larger: the arena holds ``slots`` uniform slots of the longest record
  (``record_size(max_len)`` rounded to 8) plus a staging area of ``batch_users`` slots for a batch's
  misses. The host index (user → slot) and a policy (:mod:`cachestore.tier.policy`: LRU or S3-FIFO)
  decide who is resident; :meth:`resolve` maps a batch to arena offsets: hits point at their slots, misses
  are fetched from LMDB through :class:`cachestore.decode.batch.HostBatcher` (header checks, the copying fetch)
  and copied into the staging area, and handed to the admission thread, which CRC-checks each record
  (a bad one is not admitted and counted in ``admission_errors``), asks the policy for a slot (evicting)
  and writes the record there. Admission is asynchronous: a batch never waits for it.

Consistency: the index, the policy and every arena write are changed under one lock, and the runtime
holds the same lock (:attr:`lock`) from :meth:`resolve` until its decode is enqueued on the device, so a
batch reads only slots whose contents its resolve saw, and arena writes queue on the device in the order
they were made (CUDA: synchronous copies on the legacy default stream order against the serving stream;
CPU: plain memory). Counters (:class:`TierCounters`) are per tier; :meth:`resolve` also returns the batch's.
"""

from __future__ import annotations

import os
import queue
import threading
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import HostBatcher, check_record, zero_block_bytes
from collectivekv.cachestore.store.entry import record_length
from collectivekv.cachestore.store.record import (  # CRC: bytes 0..27 + payload
    _CRC_OFFSET,
    HEADER_SIZE,
    KEY,
    RecordError,
)
from collectivekv.cachestore.tier.arena import header_bytes, key_index
from collectivekv.cachestore.tier.policy import make_policy

if TYPE_CHECKING:  # (lmdb is imported only where a store is read)
    from collectivekv.cachestore.store.reader import StoreReader

LOAD_CHUNK = 64 << 20
_ZEROS = bytes(8)  # host staging of the whole-store load (bytes)
AUTO_FRACTION = 0.8  # of the free device memory, for tier_bytes=None on CUDA
WHOLE, CACHE = "whole", "cache"


def store_bytes(reader: StoreReader) -> int:
    """Size of the store's LMDB data file: an upper bound of the bytes its records take in the arena."""
    from collectivekv.cachestore.store.publish import LMDB_DIR

    return os.stat(reader.version_dir / LMDB_DIR / "data.mdb").st_size


def plan_capacity(tier_bytes: int | None, device: torch.device, reader: StoreReader, share: float = 1.0) -> int:
    """Bytes to give the tier: ``tier_bytes`` as given; None (auto) on CUDA: the whole store when it fits in
    ``share`` x 80% of the free device memory, else that much; None on CPU: 0 (off: LMDB's page cache is host
    memory)."""
    if tier_bytes is not None:
        return int(tier_bytes)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return min(int(free * AUTO_FRACTION * share), store_bytes(reader))


@dataclass
class TierCounters:
    """hits / misses: present users found resident / fetched from LMDB; cold: users absent from the store;
    evictions; admitted; admission_errors: records refused on admission (CRC or header check)."""

    hits: int = 0
    misses: int = 0
    cold: int = 0
    evictions: int = 0
    admitted: int = 0
    admission_errors: int = 0


@dataclass
class Resolved:
    """A batch resolved by :meth:`ResidentTier.resolve`: src / n (B,) int64 (arena byte offset or -1, behaviours),
    present (B,) bool, and the batch's counters (hits and misses)."""

    src: np.ndarray
    n: np.ndarray
    present: np.ndarray
    counters: TierCounters = field(default_factory=TierCounters)


class ResidentTier:
    """See the module docstring. reader: the store version (any model's); device; capacity: bytes of records
    (:func:`plan_capacity`, > 0; the whole store when its data file fits, else the cache's slots — the arena adds
    the request area of :func:`header_bytes` and, in cache mode, the staging area); policy: "lru" | "s3fifo"
    (cache mode); batch_users: the most users a :meth:`resolve` takes; expected_model_version: the loaded
    checkpoint's."""

    def __init__(self, reader: StoreReader, device: torch.device, capacity: int, *, policy: str = "s3fifo",
                 batch_users: int = 512, expected_model_version: str | None = None, verify_crc: bool = False) -> None:
        layout = reader.layout
        self.reader, self.layout, self.device = reader, layout, torch.device(device)
        self.capacity, self.batch_users = int(capacity), batch_users
        self.version = expected_model_version or layout.model_version
        self.counters = TierCounters()
        self.lock = threading.RLock()
        self._checks = HostBatcher(layout, reader=reader, expected_model_version=self.version, pin=False,
                                   batch_users=batch_users, verify_crc=verify_crc)  # misses: CRC-checked if asked
        self.slot_bytes = (layout.record_size(layout.max_len) + 7) & -8
        self.header_bytes = header_bytes(layout, batch_users)  # the request header area at the arena's start
        if store_bytes(reader) <= self.capacity:
            self.mode = WHOLE
            try:
                self._load_whole()
            except RecordError as exc:
                err = type(exc)(f"{exc.args[0]} — in {reader.version_dir}, loading the resident tier: republish the "
                                "store version, or serve it with tier_bytes=0 (--tier-bytes 0)")
                err.user_id = exc.user_id
                raise err from exc
        else:
            self.mode = CACHE
            self._open_cache(policy)

    # ------------------------------------------------------------------------------ whole store
    def _load_whole(self) -> None:
        """Every record into one packed arena (key order), keys/offsets/lengths on the device: one pass for the
        sizes, one that streams the records through a host staging buffer of LOAD_CHUNK bytes (the store never
        sits whole in host memory), checking each chunk (:meth:`_check_chunk`) before it is copied."""
        env = self.reader._environment()
        with env.begin(buffers=True) as txn:
            sizes = np.fromiter((len(v) for v in txn.cursor().iternext(keys=False, values=True)), np.int64)
        aligned = (sizes + 7) & -8
        offset = self.header_bytes + np.cumsum(aligned) - aligned
        total = self.header_bytes + int(aligned.sum())
        self.arena = torch.zeros(total, dtype=torch.uint8, device=self.device)
        staging = torch.zeros(max(LOAD_CHUNK, int(aligned.max(initial=0))), dtype=torch.uint8,
                              pin_memory=self.device.type == "cuda")
        view = memoryview(staging.numpy())
        keys = np.empty(len(sizes), np.int64)
        length = np.empty(len(sizes), np.int64)  # behaviours per record (its header's n: parts may be capped)
        at, used, first = self.header_bytes, 0, 0  # arena offset of the staging buffer, bytes in it, its first record
        with env.begin(buffers=True) as txn:
            for i, (key, raw) in enumerate(txn.cursor()):
                if used + aligned[i] > len(view):
                    self._check_chunk(staging, keys, sizes, first, i, offset - at)
                    self.arena[at : at + used].copy_(staging[:used])  # synchronous: staging is refilled next
                    at, used, first = at + used, 0, i
                keys[i] = KEY.unpack(key)[0]
                length[i] = record_length(raw)
                end = used + int(sizes[i])
                view[used:end] = raw
                view[end : used + int(aligned[i])] = _ZEROS[: aligned[i] - sizes[i]]  # no stale bytes between records
                used += int(aligned[i])
        self._check_chunk(staging, keys, sizes, first, len(sizes), offset - at)
        self.arena[at : at + used].copy_(staging[:used])
        self.entries, self.resident_bytes = len(keys), total - self.header_bytes
        if not len(keys):  # an empty store: one key no user id (>= 0) nor padding slot (-1) matches
            keys, offset, length = np.array([np.iinfo(np.int64).min]), np.zeros(1, np.int64), np.zeros(1, np.int64)
        self.index = key_index(keys, offset, length, self.device)

    def _check_chunk(self, staging: torch.Tensor, keys: np.ndarray, sizes: np.ndarray, lo: int, hi: int,
                     starts: np.ndarray) -> None:
        """Check records lo..hi-1 in the staging buffer (record i at ``starts[i]``, ``sizes[i]`` bytes as stored in
        LMDB): every header at once
        (``HostBatcher.check_headers``: magic, version, dtypes, widths, model version, size), then each CRC with
        zlib; the first bad record raises the precise ``RecordError`` naming its user."""
        if hi <= lo:
            return
        array = staging.numpy()
        at = starts[lo:hi]
        words = array.view("<u8")[(at >> 3)[:, None] + np.arange(4)]  # (P, 4) the 32-byte headers
        size = sizes[lo:hi]
        ids = keys[lo:hi]
        self._checks.check_headers(ids, words, size, lambda j: array[at[j] : at[j] + size[j]])
        crcs = (words[:, 3] >> np.uint64(32)).tolist()
        view = memoryview(array)
        for j, (s, z, crc) in enumerate(zip(at.tolist(), size.tolist(), crcs, strict=True)):
            if zlib.crc32(view[s : s + _CRC_OFFSET], zlib.crc32(view[s + HEADER_SIZE : s + z])) != crc:
                check_record(self.layout, bytes(view[s : s + z]), self.version, int(ids[j]))  # raises

    # ------------------------------------------------------------------------------ cache mode
    def _open_cache(self, policy: str) -> None:
        self.slots = self.capacity // self.slot_bytes
        if self.slots < 1:
            raise ValueError(f"tier_bytes {self.capacity} holds no slot of {self.slot_bytes} bytes (the store's "
                             "longest record): give the tier more bytes, or 0 to turn it off")
        self.policy = make_policy(policy, self.slots)
        self.staging = self.header_bytes + self.slots * self.slot_bytes  # byte offset of the misses' staging area
        self.arena = torch.zeros(self.staging + self.batch_users * self.slot_bytes, dtype=torch.uint8,
                                 device=self.device)
        self._index: dict[int, int] = {}  # resident user -> slot
        self._slot_n = np.zeros(self.slots, dtype=np.int64)  # behaviours of each slot's record
        self._free = list(range(self.slots - 1, -1, -1))
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._admit_loop, name="tier-admission", daemon=True)
        self._thread.start()

    @property
    def entries_resident(self) -> int:
        """Users resident now."""
        return self.entries if self.mode == WHOLE else len(self._index)

    def resolve(self, ids: np.ndarray) -> Resolved:
        """Cache mode: arena offsets and lengths of ``ids`` (B,) (B <= batch_users), misses fetched from LMDB
        into the staging area and queued for admission. Call under :attr:`lock`, and keep holding it until the
        batch's reads of the arena are enqueued on the device."""
        b = len(ids)
        src, n = np.full(b, -1, np.int64), np.zeros(b, np.int64)
        slots = np.fromiter((self._index.get(u, -1) for u in ids.tolist()), np.int64, b)
        hit = slots >= 0
        for u in ids[hit].tolist():
            self.policy.hit(u)
        src[hit] = self.header_bytes + slots[hit] * self.slot_bytes
        n[hit] = self._slot_n[slots[hit]]
        present = hit.copy()
        counters = TierCounters(hits=int(hit.sum()))
        miss = np.flatnonzero(~hit)
        if len(miss):
            batch = self._checks.fetch(ids[miss])  # one read transaction; headers checked
            found = miss[batch.present]
            rec_start = batch.zero_offset + zero_block_bytes(self.layout)  # the records follow the zero block
            if len(found):
                records = batch.tensor[rec_start:]
                self.arena[self.staging : self.staging + records.numel()].copy_(records)
                src[found] = self.staging + batch.offsets[batch.present] - rec_start
                n[found] = batch.lengths[batch.present]
                present[found] = True
                self._queue.put([(int(ids[j]), bytes(batch.record(k))) for k, j in
                                 zip(np.flatnonzero(batch.present).tolist(), found.tolist(), strict=True)])
            counters.misses, counters.cold = len(found), len(miss) - len(found)
        self._count(counters)
        return Resolved(src, n, present, counters)

    def _count(self, c: TierCounters) -> None:
        self.counters.hits += c.hits
        self.counters.misses += c.misses
        self.counters.cold += c.cold

    def _admit_loop(self) -> None:
        while True:
            items = self._queue.get()
            try:
                if items is None:
                    return
                for uid, record in items:
                    self._admit(uid, record)
            finally:
                self._queue.task_done()

    def _admit(self, uid: int, record: bytes) -> None:
        """CRC-check ``record`` of ``uid`` and give it a slot (evicting per the policy); a bad record is counted."""
        try:
            check_record(self.layout, record, self.version, uid)
        except RecordError:
            with self.lock:
                self.counters.admission_errors += 1
            return
        data = torch.frombuffer(bytearray(record), dtype=torch.uint8)
        n = record_length(record)
        with self.lock:
            if uid in self._index:
                return
            for victim in self.policy.admit(uid):
                self._free.append(self._index.pop(victim))
                self.counters.evictions += 1
            slot = self._free.pop()
            at = self.header_bytes + slot * self.slot_bytes
            self.arena[at : at + len(record)].copy_(data)
            self._slot_n[slot] = n
            self._index[uid] = slot
            self.counters.admitted += 1

    def drain(self) -> None:
        """Wait until every queued admission is done (tests, warm-up)."""
        if self.mode == CACHE:
            self._queue.join()

    def close(self) -> None:
        """Stop the admission thread and let go of the arena."""
        if self.mode == CACHE and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.arena = torch.empty(0, dtype=torch.uint8)
        if self.mode == WHOLE:
            self.index = None

