"""The cache record format: one user's entry as named parts, for every model (din and the zoo: SIM,
ETA, SDIM, TWIN, HSTU; parts from :func:`model.cache_spec.entry_parts`).

The store's ``layout.json`` is an :class:`EntryLayout` (``layout_version`` 2, or 3 when a part is a joint K/V
index ``<g>.kv_idx`` or int8 user codes, kind ``q8``: readers that know only version 2 refuse such a layout instead
of misreading it): the arch, dtypes and the ordered list of parts, each ``(name, kind, width, cap)``. A user with
``n`` cached behaviours has ``min(n, cap)`` rows of ``width`` values per part; a value takes the kv dtype's size
(kind ``kv``), the index dtype's (``idx``) or one byte (``key``, bit-packed retrieval keys; ``q8``, int8 codes).
A din entry is the one group ``kv.k_user | kv.v_user | kv.k_idx | kv.v_idx`` (or ``| kv.kv_idx``) of cap
``max_len``. Record layout
(little-endian; bytes 0..11 and 16..27 are the same for every record of a store; frame, dtype codes
and errors in :mod:`cachestore.store.record`):

    off size field            meaning
      0   4  magic            b"CKVR"
      4   2  format_version   u16, = 2
      6   2  flags            u16, = 0
      8   1  kv_dtype         u8 code (record.KV_DTYPES)
      9   1  idx_dtype        u8 code, 0 when no part is an index
     10   2  n_parts          u16, number of parts
     12   4  length           u32, n
     16   4  parts_crc        u32, zlib.crc32 of the layout's parts as JSON (ties a record to its layout)
     20   8  model_version    8 raw bytes
     28   4  crc32            u32, zlib.crc32(header[0:28], zlib.crc32(payload))
     32   .  payload          the parts in layout order, each min(n, cap)·width values, row-major

The prefill Parquet has one ``payload`` binary column (schema in :func:`entry_schema`), with
``checksum = zlib.crc32(payload)``. Stores of the read-only legacy din format are read through
:mod:`cachestore.store.legacy_v1` (an EntryLayout with ``record_format`` 1); nothing writes them.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from collectivekv.cachestore.store.legacy_v1 import legacy_fields, legacy_header_parts
from collectivekv.cachestore.store.record import (
    _HEX16,
    HEADER,
    HEADER_SIZE,
    IDX_DTYPES,
    KV_DTYPES,
    MAGIC,
    BadMagicError,
    ChecksumError,
    LayoutError,
    ModelVersionMismatchError,
    RecordSizeError,
    UnknownDtypeError,
    UnsupportedVersionError,
    check_router_indices,
)
from collectivekv.model.cache_spec import KINDS, EntryPart, GroupSpec, entry_parts, index_dtype, store_config
from collectivekv.model.config import ModelConfig

if TYPE_CHECKING:
    import pyarrow as pa

ENTRY_FORMAT_VERSION = 2
LAYOUT_VERSIONS = (2, 3)  # 3: a layout with a joint index (kv_idx) or int8 user parts (q8), see layout_version_of
_CRC_OFFSET = 28
_U32 = struct.Struct("<I")
LENGTH_OFFSET = 12  # header bytes 12..15: the record's behaviour count n (u32)


def record_length(buf: bytes | memoryview) -> int:
    """The behaviour count n a record's header states (not validated: see :func:`decode_entry`)."""
    return _U32.unpack_from(buf, LENGTH_OFFSET)[0]


def entry_schema() -> pa.Schema:
    """The Arrow schema of a store's prefill Parquet (binary may be large_binary, string large_string)."""
    import pyarrow as pa  # only the writers need it: serving reads records without pyarrow

    return pa.schema([("user_id", pa.int64()), ("length", pa.int32()), ("payload", pa.binary()),
                      ("model_version", pa.string()), ("checksum", pa.int64())])  # fmt: skip


@dataclass(frozen=True)
class EntryLayout:
    """What every record of a store looks like (``layout.json`` with ``layout_version`` 2, or 3 exactly when
    the parts hold a joint index or int8 codes: :func:`layout_version_of`).

    mode "collective": kv parts are user-specific parts, idx parts router indices into pools of
    ``pool_size`` rows; mode "full": kv parts are whole K/V (width d_a), no idx parts. max_len is the
    largest n (the model's history window). record_format: the records' format_version — 2, or 1 for
    a legacy din store read through :mod:`cachestore.store.legacy_v1` (read-only; not part of the JSON).
    """

    arch: str
    mode: str
    kv_dtype: str
    idx_dtype: str | None
    pool_size: int
    max_len: int
    model_version: str
    parts: tuple[EntryPart, ...]
    layout_version: int = 2
    record_format: int = ENTRY_FORMAT_VERSION

    def __post_init__(self) -> None:
        def bad(msg: str) -> LayoutError:
            return LayoutError(f"invalid EntryLayout: {msg} ({self!r})")

        if self.layout_version not in LAYOUT_VERSIONS:
            raise bad(f"unsupported layout_version {self.layout_version}")
        if self.layout_version != layout_version_of(self.parts):
            raise bad(f"layout_version must be {layout_version_of(self.parts)} for these parts (3 iff a part is a "
                      "joint index kv_idx or int8 codes q8)")
        if self.mode not in ("collective", "full"):
            raise bad(f"mode must be 'collective' or 'full', got {self.mode!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise bad(f"kv_dtype must be one of {sorted(KV_DTYPES)}")
        if not (isinstance(self.model_version, str) and _HEX16.fullmatch(self.model_version)):
            raise bad("model_version must be 16 lowercase hex characters")
        if not self.parts or len(self.parts) > 0xFFFF:
            raise bad("needs 1..65535 parts")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise bad("part names must be unique")
        for p in self.parts:
            if p.kind not in KINDS or not 1 <= p.width <= 0xFFFF or p.cap < 0:
                raise bad(f"part {p}: kind in {KINDS}, width 1..65535, cap >= 0")
        has_idx = any(p.kind == "idx" for p in self.parts)
        if has_idx != (self.idx_dtype is not None) or (self.mode == "full" and has_idx):
            raise bad("idx_dtype must be set iff some part is an index (never in mode 'full')")
        if self.idx_dtype is not None:
            if self.idx_dtype not in IDX_DTYPES:
                raise bad(f"idx_dtype must be one of {sorted(IDX_DTYPES)}")
            limit = 1 << 16 if self.idx_dtype == "uint16" else 1 << 31
            if not 1 <= self.pool_size <= limit:
                raise bad(f"pool_size must be in 1..{limit} for {self.idx_dtype}")
        if not 0 <= self.max_len <= 0xFFFFFFFF:
            raise bad("max_len must be in 0..2**32-1")
        if self.record_format not in (1, ENTRY_FORMAT_VERSION) or (self.record_format == 1 and self.flat_group is None):
            raise bad("record_format must be 2 (or 1: a one-group din layout, read-only)")

    # --------------------------------------------------------------------------------- groups
    @functools.cached_property
    def groups(self) -> tuple[GroupSpec, ...]:
        """The K/V groups of the parts, in order (the inverse of ``model.cache_spec.group_specs``)."""
        found: dict[str, dict[str, EntryPart]] = {}
        for p in self.parts:
            group, attr = p.name.split(".", 1)
            if p.kind != "key":
                found.setdefault(group, {})[attr] = p
        out = []
        for name, g in found.items():
            k, v = g.get("k_user"), g.get("v_user")
            cap = next(iter(g.values())).cap
            joint = "kv_idx" in g
            int8 = any(p.kind == "q8" for p in g.values())
            out.append(GroupSpec(name, cap, k.width if k else 0, v.width if v else 0, "k_idx" in g or joint,
                                 "v_idx" in g or joint, joint, int8))
        return tuple(out)

    @functools.cached_property
    def flat_group(self) -> GroupSpec | None:
        """The one K/V group when a record is exactly that group's ``n`` rows per part (a din entry:
        ``k_user (n, dk) | v_user (n, dv) | k_idx (n,) | v_idx (n,)`` or ``| kv_idx (n,)``, cap ``max_len``, no
        keys) — what
        the fused kernel, the CUDA graphs and the resident tier read in place; None otherwise."""
        if len(self.groups) != 1 or any(p.kind == "key" or p.cap != self.max_len for p in self.parts):
            return None
        return self.groups[0] if self.groups[0].dk > 0 else None

    # ---------------------------------------------------------------------------------- sizes
    def itemsize(self, kind: str) -> int:
        if kind == "kv":
            return KV_DTYPES[self.kv_dtype][1].itemsize
        if kind == "idx":
            return IDX_DTYPES[self.idx_dtype][1].itemsize if self.idx_dtype else 0
        return 1  # key bytes, q8 codes

    def dtype(self, kind: str) -> np.dtype:
        """numpy storage dtype of a part kind (bfloat16: raw uint16 bits)."""
        if kind == "kv":
            return KV_DTYPES[self.kv_dtype][1]
        if kind == "idx":
            assert self.idx_dtype is not None
            return IDX_DTYPES[self.idx_dtype][1]
        return np.dtype(np.int8) if kind == "q8" else np.dtype(np.uint8)

    @functools.cached_property
    def row_bytes(self) -> tuple[int, ...]:
        """Bytes per row of each part."""
        return tuple(p.width * self.itemsize(p.kind) for p in self.parts)

    def part_sizes(self, length: int) -> list[int]:
        return [min(length, p.cap) * w for p, w in zip(self.parts, self.row_bytes, strict=True)]

    def record_size(self, length: int) -> int:
        """Exact encoded size in bytes of a record with ``length`` behaviours."""
        return HEADER_SIZE + sum(self.part_sizes(length))

    def record_sizes(self, lengths: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`record_size` (int64)."""
        n = lengths.astype(np.int64)
        total = np.full(n.shape, HEADER_SIZE, dtype=np.int64)
        for p, w in zip(self.parts, self.row_bytes, strict=True):
            total += np.minimum(n, p.cap) * w
        return total

    @functools.cached_property
    def header_parts(self) -> tuple[bytes, bytes]:
        """(record header bytes 0..11, bytes 16..27): identical in every record of the store."""
        if self.record_format != ENTRY_FORMAT_VERSION:
            return legacy_header_parts(self.kv_dtype, self.idx_dtype, self.flat_group, self.model_version)
        kv_code = KV_DTYPES[self.kv_dtype][0]
        idx_code = IDX_DTYPES[self.idx_dtype][0] if self.idx_dtype else 0
        pre = struct.pack("<4sHHBBH", MAGIC, ENTRY_FORMAT_VERSION, 0, kv_code, idx_code, len(self.parts))
        post = _U32.pack(self.parts_crc) + bytes.fromhex(self.model_version)
        return pre, post

    @functools.cached_property
    def parts_crc(self) -> int:
        return zlib.crc32(json.dumps([asdict(p) for p in self.parts], sort_keys=True).encode())

    # ----------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        """The ``layout.json`` object (``record_format`` only where it is not 2)."""
        d = asdict(self)
        d["parts"] = [asdict(p) for p in self.parts]
        if self.record_format == ENTRY_FORMAT_VERSION:
            del d["record_format"]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> EntryLayout:
        names = {f.name for f in fields(cls)}
        unknown, missing = set(data) - names, names - set(data) - {"record_format"}
        if unknown or missing:
            raise LayoutError(f"layout keys: unknown {sorted(unknown)}, missing {sorted(missing)}")
        try:
            parts = tuple(EntryPart(**p) for p in data["parts"])
        except TypeError as exc:
            raise LayoutError(f"layout parts: {exc}") from exc
        return cls(**{**data, "parts": parts})


def read_layout(path: str | os.PathLike) -> EntryLayout:
    """Read a store layout from the JSON file `path` (:func:`layout_from_dict`); LayoutError if
    absent or invalid."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise LayoutError(f"cannot read layout {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LayoutError(f"layout {path} is not a JSON object")
    return layout_from_dict(data)


def layout_from_dict(data: dict) -> EntryLayout:
    """A store layout from its dict: ``layout_version`` 2 or 3 is an :class:`EntryLayout`; a dict without a
    ``layout_version`` is read as a legacy din layout (:func:`cachestore.store.legacy_v1.legacy_fields`,
    ``record_format`` 1)."""
    if data.get("layout_version") in LAYOUT_VERSIONS:
        return EntryLayout.from_dict(data)
    return EntryLayout(**legacy_fields(data))


@dataclass(frozen=True, eq=False)
class EntryRecord:
    """A decoded record: ``arrays[name]`` is a read-only (min(n, cap), width) numpy view of the
    source buffer at the part's storage dtype (bfloat16 as uint16 bits; keys uint8)."""

    length: int
    model_version: str
    arrays: dict[str, np.ndarray]


def _finish(layout: EntryLayout, length: int, payload: memoryview | bytes, payload_crc: int | None,
            user_id: int | None) -> bytes:
    if layout.record_format != ENTRY_FORMAT_VERSION:
        raise LayoutError(f"records of format {layout.record_format} are read-only: write a store of format "
                          f"{ENTRY_FORMAT_VERSION} (prefill and publish it again)")
    want = sum(layout.part_sizes(length))
    if len(payload) != want:
        raise RecordSizeError(f"payload has {len(payload)} bytes, layout implies {want} for n={length}", user_id)
    if payload_crc is None:
        payload_crc = zlib.crc32(payload)
    pre, post = layout.header_parts
    head = pre + _U32.pack(length) + post
    return b"".join((head, _U32.pack(zlib.crc32(head, payload_crc)), payload))


def encode_entry(layout: EntryLayout, length: int, parts: list[np.ndarray], *, user_id: int | None = None) -> bytes:
    """One user's parts (numpy arrays in layout order, (min(n, cap), width) at the storage dtypes)
    → record bytes."""
    if not 0 <= length <= layout.max_len:
        raise RecordSizeError(f"length {length} outside 0..max_len={layout.max_len}", user_id)
    if len(parts) != len(layout.parts):
        raise RecordSizeError(f"{len(parts)} parts, layout has {len(layout.parts)}", user_id)
    blobs = []
    for p, a in zip(layout.parts, parts, strict=True):
        a = np.ascontiguousarray(a, dtype=layout.dtype(p.kind))
        if a.shape != (min(length, p.cap), p.width):
            raise RecordSizeError(f"part {p.name} has shape {a.shape}, layout implies "
                                  f"{(min(length, p.cap), p.width)}", user_id)  # fmt: skip
        blobs.append(a.tobytes())
    return _finish(layout, length, b"".join(blobs), None, user_id)


def decode_entry(layout: EntryLayout, buf: bytes | bytearray | memoryview, *,
                 expected_model_version: str | None = None, user_id: int | None = None) -> EntryRecord:
    """Validate a record against its store's layout and split it into parts (zero-copy views).

    Raises a RecordError subclass naming the user on: bad magic, other format version, dtype codes /
    part count / parts CRC not the layout's, size, CRC, or model version mismatch.
    """
    mv = memoryview(buf).cast("B")
    if mv.nbytes < HEADER_SIZE:
        raise RecordSizeError(f"truncated record: {mv.nbytes} bytes < {HEADER_SIZE}-byte header", user_id)
    magic, version, *_ = HEADER.unpack_from(mv)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {magic!r}, expected {MAGIC!r}", user_id)
    if version != layout.record_format:
        raise UnsupportedVersionError(f"record format version {version}, the store's layout needs "
                                      f"{layout.record_format}", user_id)  # fmt: skip
    pre, post = layout.header_parts
    if bytes(mv[:12]) != pre or bytes(mv[16:20]) != post[:4]:
        raise UnknownDtypeError(f"header {bytes(mv[:20]).hex()} does not match the store layout "
                                f"(dtype codes, part count, parts CRC)", user_id)  # fmt: skip
    n = record_length(mv)
    sizes = layout.part_sizes(n)
    want = HEADER_SIZE + sum(sizes)
    if mv.nbytes != want or n > layout.max_len:
        kind = "truncated" if mv.nbytes < want else "over-long"
        raise RecordSizeError(f"{kind} record: {mv.nbytes} bytes, n={n} implies {want} (max_len "
                              f"{layout.max_len})", user_id)  # fmt: skip
    if zlib.crc32(mv[:_CRC_OFFSET], zlib.crc32(mv[HEADER_SIZE:])) != _U32.unpack_from(mv, _CRC_OFFSET)[0]:
        raise ChecksumError("CRC mismatch: record is corrupt", user_id)
    mver = bytes(mv[20:28]).hex()
    if expected_model_version is not None and mver != expected_model_version:
        raise ModelVersionMismatchError(f"model version {mver} != expected {expected_model_version}", user_id)
    u8 = np.frombuffer(mv, dtype=np.uint8)
    if not mv.readonly:
        u8.flags.writeable = False
    arrays, at = {}, HEADER_SIZE
    for p, size in zip(layout.parts, sizes, strict=True):
        arrays[p.name] = u8[at : at + size].view(layout.dtype(p.kind)).reshape(min(n, p.cap), p.width)
        at += size
    return EntryRecord(length=n, model_version=mver, arrays=arrays)


def entry_from_parquet_row(layout: EntryLayout, *, user_id: int, length: int, payload: bytes, model_version: str,
                           checksum: int) -> bytes:
    """Encode one prefill Parquet row after verifying model version, length, size and checksum."""
    if model_version != layout.model_version:
        raise ModelVersionMismatchError(
            f"row model_version {model_version!r} != layout {layout.model_version!r}", user_id)
    if not 0 <= length <= layout.max_len:
        raise RecordSizeError(f"length {length} outside 0..max_len={layout.max_len}", user_id)
    crc = zlib.crc32(payload)
    if crc != checksum:
        raise ChecksumError(f"Parquet checksum {checksum} != crc32 of the row's payload {crc}", user_id)
    return _finish(layout, length, payload, crc, user_id)


def entry_layout(cfg: ModelConfig, model_version: str, mode: str = "collective", kv_dtype: str = "float16"
                 ) -> EntryLayout:
    """The EntryLayout a prefill of this model writes: ``mode`` "collective" (the model's own
    cache) or "full" (every group's K/V rebuilt at d_a: the full-KV baseline store)."""
    if mode not in ("collective", "full"):
        raise ValueError(f"mode must be 'collective' or 'full', got {mode!r}")
    if mode == "collective" and cfg.kv_mode != "collective":
        raise ValueError("the checkpoint is a full-KV model: it has no collective cache (use mode 'full')")
    parts = entry_parts(store_config(cfg, mode))
    has_idx = any(p.kind == "idx" for p in parts)
    idx = index_dtype(cfg.collective.pool_size) if has_idx else None
    return EntryLayout(arch=cfg.arch, mode=mode, kv_dtype=kv_dtype, idx_dtype=idx,
                       pool_size=cfg.collective.pool_size if has_idx else 0, max_len=cfg.window_len,
                       model_version=model_version, parts=parts, layout_version=layout_version_of(parts))  # fmt: skip


def layout_version_of(parts: tuple[EntryPart, ...]) -> int:
    """3 when some part is a joint K/V index (``<g>.kv_idx``) or int8 user codes (kind ``q8``), else 2."""
    return 3 if any(p.kind == "q8" or p.name.endswith(".kv_idx") for p in parts) else 2


def check_indices(layout: EntryLayout, record: EntryRecord, user_id: int | None) -> None:
    """The router indices of a decoded record (every ``idx`` part) against ``layout.pool_size``:
    :class:`cachestore.store.record.RouterIndexError` naming the user and the part."""
    for part in layout.parts:
        if part.kind == "idx":
            check_router_indices(record.arrays[part.name].reshape(-1), layout.pool_size, part.name, user_id)
