"""The per-user cache record: an explicit, versioned binary format (no pickle).

One record holds one user's cached behaviours: the low-dimensional user-specific K/V parts and,
for shared (collective) K/V, the router indices into the global pool. All integers and values are
little-endian. Layout (32-byte header, then the payload; see docs/store_format.md):

    off size field            meaning
      0   4  magic            b"CKVR"
      4   2  format_version   u16, = 1
      6   2  flags            u16, bit0 k_shared, bit1 v_shared, other bits 0
      8   1  kv_dtype         u8 code: 1 float16, 2 bfloat16 (raw 2 bytes), 3 float32
      9   1  idx_dtype        u8 code: 0 none, 1 uint16, 2 int32 (0 iff no flag set)
     10   2  reserved         u16, = 0
     12   4  length           u32, n = number of cached behaviours (0 allowed)
     16   2  dk               u16, per-behaviour width of the stored user K part
     18   2  dv               u16, per-behaviour width of the stored user V part
     20   8  model_version    8 raw bytes (16 lowercase hex chars as text)
     28   4  crc32            u32, zlib.crc32(payload + header[0:28])
     32   .  payload          k_user (n*dk) | v_user (n*dv) | k_idx (n or 0) | v_idx (n or 0)

Invariants: len(record) == 32 + n*(dk+dv)*kv_size + n*idx_size*(k_shared+v_shared), exactly. The
CRC covers the payload *and* the header (so any single corrupted byte is detected); the payload
comes first so the CRC continues from the Parquet checksum, crc32(payload), in one pass.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

MAGIC = b"CKVR"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHBBHIHH8sI")
HEADER_SIZE = HEADER.size  # 32
_CRC_OFFSET = 28
FLAG_K_SHARED = 1
FLAG_V_SHARED = 2
KV_DTYPES: dict[str, tuple[int, np.dtype]] = {  # name -> (code, numpy storage dtype)
    "float16": (1, np.dtype("<f2")),
    "bfloat16": (2, np.dtype("<u2")),  # raw bf16 bits; torch: from_numpy(a).view(torch.bfloat16)
    "float32": (3, np.dtype("<f4")),
}
IDX_DTYPES: dict[str, tuple[int, np.dtype]] = {"uint16": (1, np.dtype("<u2")), "int32": (2, np.dtype("<i4"))}
_KV_BY_CODE = {code: name for name, (code, _) in KV_DTYPES.items()}
_IDX_BY_CODE = {code: name for name, (code, _) in IDX_DTYPES.items()}
KEY = struct.Struct(">Q")  # LMDB key: user id as 8-byte big-endian unsigned (sorts numerically)
_HEX16 = re.compile(r"[0-9a-f]{16}")


class RecordError(ValueError):
    """Base class: a record (or a Parquet row) that must not be decoded or stored."""

    def __init__(self, message: str, user_id: int | None = None) -> None:
        self.user_id = user_id
        super().__init__(message if user_id is None else f"user {user_id}: {message}")


class BadMagicError(RecordError):
    """The buffer does not start with b"CKVR"."""


class UnsupportedVersionError(RecordError):
    """The header's format_version is not one this code reads."""


class UnknownDtypeError(RecordError):
    """A dtype code (or flags/reserved bits) in the header is not defined."""


class RecordSizeError(RecordError):
    """Truncated or over-long buffer, or a part whose size disagrees with the header."""


class ChecksumError(RecordError):
    """CRC mismatch: the record (or the Parquet row's checksum) is corrupt."""


class ModelVersionMismatchError(RecordError):
    """The record was written by a different model version than the one expected."""


class RouterIndexError(RecordError):
    """A router index outside the store's pool (0 .. pool_size - 1): the record is corrupt. Raised on the
    CPU paths and, after the batch, by the runtime for the device paths (which mask such loads)."""


def check_router_indices(idx: np.ndarray | None, pool_size: int, side: str, user_id: int | None) -> None:
    """RouterIndexError (naming the user, the side and the behaviour) if ``idx`` holds an index outside
    0 .. pool_size - 1; one vectorised pass, nothing for an unshared side (None)."""
    if idx is None or not idx.size:
        return
    bad = np.flatnonzero((idx < 0) | (idx >= pool_size))
    if bad.size:
        raise RouterIndexError(f"{side} router index {int(idx[bad[0]])} at behaviour {int(bad[0])} is outside the "
                               f"pool 0..{pool_size - 1}: the record is corrupt (run `ckv store verify STORE`)",
                               user_id)


class LayoutError(ValueError):
    """An invalid or unreadable CacheLayout."""


@dataclass(frozen=True)
class CacheLayout:
    """What every record of one store looks like; written as JSON next to the data.

    mode "collective": dk/dv are the user-specific widths, k_shared/v_shared say which of K/V carry
    router indices (of idx_dtype) into pools of pool_size rows. mode "full": dk = dv = d_a, no indices.
    """

    mode: str
    kv_dtype: str
    idx_dtype: str | None
    dk: int
    dv: int
    k_shared: bool
    v_shared: bool
    pool_size: int
    max_len: int
    model_version: str
    layout_version: int = 1

    def __post_init__(self) -> None:
        def bad(msg: str) -> LayoutError:
            return LayoutError(f"invalid CacheLayout: {msg} ({self!r})")

        if self.layout_version != 1:
            raise bad(f"unsupported layout_version {self.layout_version}")
        if self.mode not in ("collective", "full"):
            raise bad(f"mode must be 'collective' or 'full', got {self.mode!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise bad(f"kv_dtype must be one of {sorted(KV_DTYPES)}")
        if not (isinstance(self.k_shared, bool) and isinstance(self.v_shared, bool)):
            raise bad("k_shared and v_shared must be bool")
        for name in ("dk", "dv", "pool_size", "max_len"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be an int")
        if not (1 <= self.dk <= 0xFFFF and 1 <= self.dv <= 0xFFFF):
            raise bad("dk and dv must be in 1..65535")
        if not 0 <= self.max_len <= 0xFFFFFFFF:
            raise bad("max_len must be in 0..2**32-1")
        if not (isinstance(self.model_version, str) and _HEX16.fullmatch(self.model_version)):
            raise bad("model_version must be 16 lowercase hex characters")
        shared = self.k_shared or self.v_shared
        if self.mode == "full" and (shared or self.dk != self.dv):
            raise bad("mode 'full' needs dk == dv and no shared K/V")
        if shared != (self.idx_dtype is not None):
            raise bad("idx_dtype must be set iff k_shared or v_shared")
        if self.idx_dtype is not None:
            if self.idx_dtype not in IDX_DTYPES:
                raise bad(f"idx_dtype must be one of {sorted(IDX_DTYPES)} or None")
            limit = 1 << 16 if self.idx_dtype == "uint16" else 1 << 31
            if not 1 <= self.pool_size <= limit:
                raise bad(f"pool_size must be in 1..{limit} for {self.idx_dtype}")
        elif self.pool_size < 0:
            raise bad("pool_size must be >= 0")

    @functools.cached_property
    def header_parts(self) -> tuple[bytes, bytes, tuple[int, int, int, int]]:
        """(record header bytes 0..11, bytes 16..27, bytes per behaviour of each payload part)."""
        kv_code, kv_dt = KV_DTYPES[self.kv_dtype]
        idx_code, idx_size = 0, 0
        if self.idx_dtype is not None:
            idx_code, idx_size = IDX_DTYPES[self.idx_dtype][0], IDX_DTYPES[self.idx_dtype][1].itemsize
        flags = (FLAG_K_SHARED if self.k_shared else 0) | (FLAG_V_SHARED if self.v_shared else 0)
        pre = struct.pack("<4sHHBBH", MAGIC, FORMAT_VERSION, flags, kv_code, idx_code, 0)
        post = struct.pack("<HH8s", self.dk, self.dv, bytes.fromhex(self.model_version))
        widths = (self.dk * kv_dt.itemsize, self.dv * kv_dt.itemsize,
                  idx_size if self.k_shared else 0, idx_size if self.v_shared else 0)
        return pre, post, widths

    def record_size(self, length: int) -> int:
        """Exact encoded size in bytes of a record with `length` behaviours."""
        kv = KV_DTYPES[self.kv_dtype][1].itemsize
        idx = IDX_DTYPES[self.idx_dtype][1].itemsize if self.idx_dtype else 0
        return HEADER_SIZE + length * ((self.dk + self.dv) * kv + idx * (self.k_shared + self.v_shared))

    def record_sizes(self, lengths: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`record_size` (int64), as ``EntryLayout.record_sizes``."""
        return HEADER_SIZE + lengths.astype(np.int64, copy=False) * sum(self.header_parts[2])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CacheLayout:
        names = {f.name for f in fields(cls)}
        unknown, missing = set(data) - names, names - set(data) - {"layout_version"}
        if unknown or missing:
            raise LayoutError(f"layout keys: unknown {sorted(unknown)}, missing {sorted(missing)}")
        return cls(**data)


def write_layout(path: str | os.PathLike, layout: CacheLayout) -> None:
    """Write `layout` as JSON to the file `path` (write to a temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(layout.to_dict(), fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def user_key(user_id: int) -> bytes:
    """LMDB key of a user: 8-byte big-endian unsigned, so byte order == numeric order."""
    if not 0 <= user_id < 1 << 63:
        raise RecordError(f"user id must be in 0..2**63-1 (int64, non-negative), got {user_id}")
    return KEY.pack(user_id)


def key_user(key: bytes) -> int:
    """Inverse of user_key."""
    return KEY.unpack(key)[0]


@dataclass(frozen=True, eq=False)
class Record:
    """A decoded record. Arrays are read-only numpy views of the source buffer (zero-copy).

    k_user: (length, dk), v_user: (length, dv), of float16 / float32 / uint16 (= raw bfloat16 bits);
    k_idx / v_idx: (length,) uint16 or int32, or None when that side is not shared.
    """

    length: int
    dk: int
    dv: int
    kv_dtype: str
    idx_dtype: str | None
    k_shared: bool
    v_shared: bool
    model_version: str
    k_user: np.ndarray
    v_user: np.ndarray
    k_idx: np.ndarray | None
    v_idx: np.ndarray | None


def _as_bytes(part: object, name: str, user_id: int | None) -> memoryview:
    """A flat byte view of bytes / bytearray / memoryview / contiguous numpy array."""
    if isinstance(part, np.ndarray):
        if part.dtype.byteorder == ">":
            part = part.astype(part.dtype.newbyteorder("<"))
        part = np.ascontiguousarray(part).reshape(-1).view(np.uint8)  # flat bytes (also for empty (0, d))
    try:
        return memoryview(part).cast("B")  # type: ignore[arg-type]
    except TypeError as exc:
        raise RecordError(f"{name}: expected bytes-like or numpy array, got {type(part)}", user_id) from exc


def payload_checksum(k_user: object, v_user: object, k_idx: object = b"", v_idx: object = b"") -> int:
    """The Parquet `checksum` column: zlib.crc32 over k_user + v_user + k_idx + v_idx."""
    crc = 0
    for name, part in zip(_PARTS, (k_user, v_user, k_idx, v_idx), strict=True):
        crc = zlib.crc32(_as_bytes(part, name, None), crc)
    return crc


_PARTS = ("k_user", "v_user", "k_idx", "v_idx")
_U32 = struct.Struct("<I")


def _finish(layout: CacheLayout, length: int, parts: list, payload_crc: int | None,
            user_id: int | None) -> bytes:
    """Check part sizes (flat byte buffers) against the header; assemble header + CRC + payload."""
    pre, post, widths = layout.header_parts
    for name, part, width in zip(_PARTS, parts, widths, strict=True):
        if len(part) != length * width:
            raise RecordSizeError(f"{name} has {len(part)} bytes, layout implies {length * width}", user_id)
    if payload_crc is None:
        payload_crc = 0
        for part in parts:
            payload_crc = zlib.crc32(part, payload_crc)
    head = pre + _U32.pack(length) + post
    return b"".join((head, _U32.pack(zlib.crc32(head, payload_crc)), *parts))


def encode_record(
    layout: CacheLayout,
    *,
    length: int,
    k_user: object,
    v_user: object,
    k_idx: object = b"",
    v_idx: object = b"",
    user_id: int | None = None,
    payload_crc: int | None = None,
) -> bytes:
    """Encode one user's parts (bytes-like or numpy, little-endian) as a record of `layout`.

    Each part's byte size must match the layout; an unshared side's index part must be empty.
    `payload_crc` (= payload_checksum of the parts, already verified by the caller) skips a pass.
    """
    if not 0 <= length <= 0xFFFFFFFF:
        raise RecordSizeError(f"length {length} out of range", user_id)
    parts = [_as_bytes(p, n, user_id) for n, p in zip(_PARTS, (k_user, v_user, k_idx, v_idx), strict=True)]
    return _finish(layout, length, parts, payload_crc, user_id)


def decode_record(
    buf: bytes | bytearray | memoryview,
    *,
    expected_model_version: str | bytes | None = None,
    user_id: int | None = None,
) -> Record:
    """Validate and decode a record; arrays are zero-copy views of `buf` (keep it alive).

    Raises a RecordError subclass (never returns garbage) on: bad magic, unknown format version,
    unknown dtype code / flag / reserved bits, size mismatch, CRC mismatch, model version mismatch.
    """
    mv = memoryview(buf).cast("B")
    if mv.nbytes < HEADER_SIZE:
        raise RecordSizeError(f"truncated record: {mv.nbytes} bytes < {HEADER_SIZE}-byte header", user_id)
    magic, version, flags, kv_code, idx_code, reserved, n, dk, dv, mver, crc = HEADER.unpack_from(mv)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {magic!r}, expected {MAGIC!r}", user_id)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"unknown record format version {version}", user_id)
    if reserved != 0 or flags & ~(FLAG_K_SHARED | FLAG_V_SHARED):
        raise UnknownDtypeError(f"undefined header bits (flags {flags:#x}, reserved {reserved:#x})", user_id)
    kv_name, idx_name = _KV_BY_CODE.get(kv_code), _IDX_BY_CODE.get(idx_code)
    if kv_name is None:
        raise UnknownDtypeError(f"unknown kv dtype code {kv_code}", user_id)
    k_sh, v_sh = bool(flags & FLAG_K_SHARED), bool(flags & FLAG_V_SHARED)
    if idx_code != 0 and idx_name is None:
        raise UnknownDtypeError(f"unknown idx dtype code {idx_code}", user_id)
    if (idx_code == 0) == (k_sh or v_sh):
        raise UnknownDtypeError(f"idx dtype code {idx_code} inconsistent with flags {flags:#x}", user_id)
    kv_dt = KV_DTYPES[kv_name][1]
    idx_dt = IDX_DTYPES[idx_name][1] if idx_name else None
    sizes = [n * dk * kv_dt.itemsize, n * dv * kv_dt.itemsize]
    sizes += [n * idx_dt.itemsize if (idx_dt and shared) else 0 for shared in (k_sh, v_sh)]
    want = HEADER_SIZE + sum(sizes)
    if mv.nbytes != want:
        kind = "truncated" if mv.nbytes < want else "over-long"
        raise RecordSizeError(f"{kind} record: {mv.nbytes} bytes, header implies {want}", user_id)
    if zlib.crc32(mv[:_CRC_OFFSET], zlib.crc32(mv[HEADER_SIZE:])) != crc:
        raise ChecksumError("CRC mismatch: record is corrupt", user_id)
    if expected_model_version is not None:
        exp = expected_model_version if isinstance(expected_model_version, bytes) else (
            bytes.fromhex(expected_model_version))
        if mver != exp:
            raise ModelVersionMismatchError(f"model version {mver.hex()} != expected {exp.hex()}", user_id)
    # One uint8 view of the whole record, then per-part slices re-viewed (zero-copy, no alignment
    # requirement); read-only even when `buf` is writable.
    u8 = np.frombuffer(mv, dtype=np.uint8)
    if not mv.readonly:
        u8.flags.writeable = False
    a, b, c = HEADER_SIZE + sizes[0], HEADER_SIZE + sizes[0] + sizes[1], want - sizes[3]
    return Record(
        length=n, dk=dk, dv=dv, kv_dtype=kv_name, idx_dtype=idx_name, k_shared=k_sh, v_shared=v_sh,
        model_version=mver.hex(),
        k_user=u8[HEADER_SIZE:a].view(kv_dt).reshape(n, dk),
        v_user=u8[a:b].view(kv_dt).reshape(n, dv),
        k_idx=u8[b:c].view(idx_dt) if (idx_dt and k_sh) else None,
        v_idx=u8[c:want].view(idx_dt) if (idx_dt and v_sh) else None,
    )


def record_from_parquet_row(
    layout: CacheLayout,
    *,
    user_id: int,
    length: int,
    k_user: bytes,
    v_user: bytes,
    k_idx: bytes,
    v_idx: bytes,
    model_version: str,
    checksum: int,
) -> bytes:
    """Encode one prefill Parquet row (columns as named in the schema) after verifying it.

    Checks: model_version == layout.model_version, 0 <= length <= layout.max_len, part sizes match
    the layout, and checksum == zlib.crc32(k_user + v_user + k_idx + v_idx). Errors name the user.
    """
    if model_version != layout.model_version:
        raise ModelVersionMismatchError(
            f"row model_version {model_version!r} != layout {layout.model_version!r}", user_id)
    if not 0 <= length <= layout.max_len:
        raise RecordSizeError(f"length {length} outside 0..max_len={layout.max_len}", user_id)
    pre, post, (wk, wv, wki, wvi) = layout.header_parts
    sizes = (length * wk, length * wv, length * wki, length * wvi)
    parts = (k_user, v_user, k_idx, v_idx)
    if not all(type(p) is bytes for p in parts):  # Arrow gives bytes; anything else: flat byte views
        parts = tuple(_as_bytes(p, n, user_id) for n, p in zip(_PARTS, parts, strict=True))
        k_user, v_user, k_idx, v_idx = parts
    if (len(k_user), len(v_user), len(k_idx), len(v_idx)) != sizes:
        for name, part, want in zip(_PARTS, parts, sizes, strict=True):
            if len(part) != want:
                raise RecordSizeError(f"{name} has {len(part)} bytes, layout implies {want}", user_id)
    crc = zlib.crc32(v_idx, zlib.crc32(k_idx, zlib.crc32(v_user, zlib.crc32(k_user))))
    if crc != checksum:
        raise ChecksumError(f"Parquet checksum {checksum} != crc32 of the row's bytes {crc}", user_id)
    head = pre + _U32.pack(length) + post
    return b"".join((head, _U32.pack(zlib.crc32(head, crc)), k_user, v_user, k_idx, v_idx))
