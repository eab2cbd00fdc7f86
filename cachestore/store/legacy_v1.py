"""Read-only reader of legacy din stores (record format 1): their layout as a din :class:`EntryLayout`.

A format-1 store's ``layout.json`` has no ``layout_version`` 2; it is the flat dict

    mode, kv_dtype, idx_dtype, dk, dv, k_shared, v_shared, pool_size, max_len, model_version
    [, layout_version 1]

and its records carry the header below before a payload ``k_user (n, dk) | v_user (n, dv) | k_idx (n,)
| v_idx (n,)`` (an unshared side has no index part) — byte for byte the payload of the din entry
``kv.k_user | kv.v_user | kv.k_idx | kv.v_idx`` of cap ``max_len``:

    off size field            meaning
      0   4  magic            b"CKVR"
      4   2  format_version   u16, = 1
      6   2  flags            u16, bit0 k_shared, bit1 v_shared
      8   1  kv_dtype         u8 code (record.KV_DTYPES)
      9   1  idx_dtype        u8 code, 0 when no side is shared
     10   2  reserved         u16, = 0
     12   4  length           u32, n
     16   2  dk               u16
     18   2  dv               u16
     20   8  model_version    8 raw bytes
     28   4  crc32            u32, zlib.crc32(header[0:28], zlib.crc32(payload)) (as in format 2)

:func:`legacy_fields` gives the fields of the equivalent din EntryLayout with ``record_format`` 1
(``cachestore.store.entry.layout_from_dict`` builds it), whose ``header_parts`` (:func:`legacy_header_parts`)
are these bytes 0..11 and 16..27: the batcher's vectorised
header check, ``cachestore.store.entry.decode_entry`` (→ ``EntryRecord``) and every reader then serve the store
unchanged. Writers refuse such a layout: nothing writes format 1.
"""

from __future__ import annotations

import struct
from typing import Any

from collectivekv.cachestore.store.record import _HEX16, IDX_DTYPES, KV_DTYPES, MAGIC, LayoutError
from collectivekv.model.cache_spec import EntryPart, GroupSpec

LEGACY_FORMAT = 1
FLAG_K_SHARED, FLAG_V_SHARED = 1, 2
_FIELDS = {"mode": str, "kv_dtype": str, "idx_dtype": (str, type(None)), "dk": int, "dv": int, "k_shared": bool,
           "v_shared": bool, "pool_size": int, "max_len": int, "model_version": str}


def _check(data: dict) -> None:
    """LayoutError unless ``data`` is a well-formed format-1 layout dict."""
    unknown = set(data) - set(_FIELDS) - {"layout_version"}
    missing = set(_FIELDS) - set(data)
    if unknown or missing:
        raise LayoutError(f"layout keys: unknown {sorted(unknown)}, missing {sorted(missing)}")
    if data.get("layout_version", LEGACY_FORMAT) != LEGACY_FORMAT:
        raise LayoutError(f"unsupported layout_version {data['layout_version']!r}")
    for name, kind in _FIELDS.items():
        value = data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise LayoutError(f"layout field {name} = {value!r} has the wrong type")
    if not (1 <= data["dk"] <= 0xFFFF and 1 <= data["dv"] <= 0xFFFF):
        raise LayoutError("dk and dv must be in 1..65535")
    if not _HEX16.fullmatch(data["model_version"]):
        raise LayoutError("model_version must be 16 lowercase hex characters")
    if data["mode"] == "full" and (data["k_shared"] or data["v_shared"] or data["dk"] != data["dv"]):
        raise LayoutError("mode 'full' needs dk == dv and no shared K/V")


def legacy_fields(data: dict) -> dict[str, Any]:
    """The :class:`cachestore.store.entry.EntryLayout` fields (``record_format`` 1) of the din entry equivalent to a
    format-1 layout dict; LayoutError if the dict is not one. Dtypes, pool size and window are checked by
    EntryLayout itself."""
    _check(data)
    cap = data["max_len"]
    parts = [EntryPart("kv.k_user", "kv", data["dk"], cap), EntryPart("kv.v_user", "kv", data["dv"], cap)]
    parts += [EntryPart(f"kv.{side}_idx", "idx", 1, cap) for side in "kv" if data[f"{side}_shared"]]
    return {"arch": "din", "mode": data["mode"], "kv_dtype": data["kv_dtype"], "idx_dtype": data["idx_dtype"],
            "pool_size": data["pool_size"] if data["idx_dtype"] else 0, "max_len": cap,
            "model_version": data["model_version"], "parts": tuple(parts), "record_format": LEGACY_FORMAT}


def legacy_header_parts(kv_dtype: str, idx_dtype: str | None, group: GroupSpec | None, model_version: str
                        ) -> tuple[bytes, bytes]:
    """Format-1 record header bytes 0..11 and 16..27 of a din layout's one group (dk, dv, shared sides)."""
    if group is None:
        raise LayoutError(f"format {LEGACY_FORMAT} records hold one din K/V group")
    flags = (FLAG_K_SHARED if group.k_shared else 0) | (FLAG_V_SHARED if group.v_shared else 0)
    idx_code = IDX_DTYPES[idx_dtype][0] if idx_dtype else 0
    pre = struct.pack("<4sHHBBH", MAGIC, LEGACY_FORMAT, flags, KV_DTYPES[kv_dtype][0], idx_code, 0)
    return pre, struct.pack("<HH8s", group.dk, group.dv, bytes.fromhex(model_version))
