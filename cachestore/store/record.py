"""What every cache record shares: the 32-byte header frame, dtype codes, LMDB keys, errors.

A store holds one record per user (LMDB value; key :func:`user_key`). The record format itself —
the store's :class:`cachestore.store.entry.EntryLayout`, its parts and the encoder / decoder — lives in
:mod:`cachestore.store.entry` (docs/store_format.md). Every record has the same frame (little-endian):

    off size field            meaning
      0   4  magic            b"CKVR"
      4   2  format_version   u16
      6  22  ...              per format (dtype codes, length n at 12..15, model version at 20..27)
     28   4  crc32            u32, zlib.crc32(header[0:28], zlib.crc32(payload))
     32   .  payload

The CRC covers the payload *and* the header (so any single corrupted byte is detected); the payload
comes first so the CRC continues from the Parquet checksum, crc32(payload), in one pass. Nothing
here imports torch or lmdb.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Protocol

import numpy as np

MAGIC = b"CKVR"
HEADER = struct.Struct("<4sHHBBHIHH8sI")
HEADER_SIZE = HEADER.size  # 32
_CRC_OFFSET = 28
KV_DTYPES: dict[str, tuple[int, np.dtype]] = {  # name -> (code, numpy storage dtype)
    "float16": (1, np.dtype("<f2")),
    "bfloat16": (2, np.dtype("<u2")),  # raw bf16 bits; torch: from_numpy(a).view(torch.bfloat16)
    "float32": (3, np.dtype("<f4")),
}
IDX_DTYPES: dict[str, tuple[int, np.dtype]] = {"uint16": (1, np.dtype("<u2")), "int32": (2, np.dtype("<i4"))}
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
    """An invalid or unreadable store layout (``layout.json``)."""


class _Layout(Protocol):
    def to_dict(self) -> dict: ...


def write_layout(path: str | os.PathLike, layout: _Layout) -> None:
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
