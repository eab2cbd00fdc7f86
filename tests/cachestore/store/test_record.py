"""The binary record format (cachestore/store/record.py frame, cachestore/store/entry.py records) on din layouts:
round trips, corruption, header checks, Parquet rows, layout JSON, LMDB keys."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.store.entry import (
    EntryLayout,
    EntryRecord,
    decode_entry,
    encode_entry,
    entry_from_parquet_row,
    read_layout,
)
from collectivekv.cachestore.store.record import (
    HEADER_SIZE,
    BadMagicError,
    ChecksumError,
    LayoutError,
    ModelVersionMismatchError,
    RecordError,
    RecordSizeError,
    UnknownDtypeError,
    UnsupportedVersionError,
    key_user,
    user_key,
    write_layout,
)
from collectivekv.model.cache_spec import EntryPart

MV = "0123456789abcdef"
KV_DTYPES = ("bfloat16", "float16", "float32")


def din_layout(kv_dtype: str, dk: int, dv: int, k_shared: bool, v_shared: bool, idx_dtype: str | None = "uint16",
               pool_size: int = 1000, max_len: int = 64, model_version: str = MV) -> EntryLayout:
    """A din EntryLayout: the one group ``kv`` (mode "full" when no side is shared)."""
    parts = [EntryPart("kv.k_user", "kv", dk, max_len), EntryPart("kv.v_user", "kv", dv, max_len)]
    parts += [EntryPart(f"kv.{s}_idx", "idx", 1, max_len) for s, on in (("k", k_shared), ("v", v_shared)) if on]
    shared = k_shared or v_shared
    return EntryLayout("din", "collective" if shared else "full", kv_dtype, idx_dtype if shared else None,
                       pool_size if shared else 0, max_len, model_version, tuple(parts))


@st.composite
def layouts(draw: st.DrawFn) -> EntryLayout:
    kv = draw(st.sampled_from(KV_DTYPES))
    if draw(st.booleans()):
        d = draw(st.integers(1, 6))
        return din_layout(kv, d, d, False, False, model_version=draw(st.sampled_from([MV, "f" * 16])))
    k_sh, v_sh = draw(st.booleans()), draw(st.booleans())
    return din_layout(kv, draw(st.integers(1, 4)), draw(st.integers(1, 4)), k_sh, v_sh,
                      draw(st.sampled_from(["uint16", "int32"])))


@st.composite
def records(draw: st.DrawFn) -> tuple[EntryLayout, int, list[np.ndarray]]:
    layout = draw(layouts())
    n = draw(st.integers(0, 5))
    parts = [np.frombuffer(draw(st.binary(min_size=n * w, max_size=n * w)), layout.dtype(p.kind)).reshape(n, p.width)
             for p, w in zip(layout.parts, layout.row_bytes, strict=True)]  # fmt: skip
    return layout, n, parts


@settings(max_examples=200, deadline=None)
@given(records())
def test_round_trip(rec: tuple[EntryLayout, int, list[np.ndarray]]) -> None:
    layout, n, parts = rec
    buf = encode_entry(layout, n, parts)
    assert len(buf) == layout.record_size(n)
    r = decode_entry(layout, buf, expected_model_version=layout.model_version)
    assert isinstance(r, EntryRecord) and (r.length, r.model_version) == (n, layout.model_version)
    for p, a in zip(layout.parts, parts, strict=True):
        assert r.arrays[p.name].shape == (n, p.width) and r.arrays[p.name].tobytes() == a.tobytes()
        assert not r.arrays[p.name].flags.writeable
    g = layout.flat_group
    assert g is not None and (g.k_shared, g.v_shared) == ("kv.k_idx" in r.arrays, "kv.v_idx" in r.arrays)


@settings(max_examples=100, deadline=None)
@given(records(), st.data())
def test_any_single_byte_corruption_is_detected(rec: tuple[EntryLayout, int, list], data: st.DataObject) -> None:
    layout, n, parts = rec
    buf = bytearray(encode_entry(layout, n, parts))
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RecordError):
        decode_entry(layout, bytes(buf))


LAYOUT = din_layout("float16", 2, 1, True, True, max_len=50)


def _good() -> bytes:
    k, v = np.arange(4, dtype=np.float16).reshape(2, 2), np.arange(2, dtype=np.float16)[:, None]
    return encode_entry(LAYOUT, 2, [k, v, np.array([[3], [999]], np.uint16), np.array([[0], [1]], np.uint16)],
                        user_id=7)


def test_every_bit_flip_of_one_record_is_detected() -> None:
    buf = _good()
    for pos in range(len(buf)):
        for bit in range(8):
            bad = bytearray(buf)
            bad[pos] ^= 1 << bit
            with pytest.raises(RecordError):
                decode_entry(LAYOUT, bytes(bad))


@settings(max_examples=100, deadline=None)
@given(records(), st.data())
def test_truncation_and_extension_are_detected(rec: tuple[EntryLayout, int, list], data: st.DataObject) -> None:
    layout, n, parts = rec
    buf = encode_entry(layout, n, parts)
    cut = data.draw(st.integers(HEADER_SIZE, len(buf) - 1)) if len(buf) > HEADER_SIZE else None
    if cut is not None:
        with pytest.raises(RecordSizeError, match="truncated"):
            decode_entry(layout, buf[:cut])
    with pytest.raises(RecordSizeError, match="truncated record|header"):
        decode_entry(layout, buf[: data.draw(st.integers(0, HEADER_SIZE - 1))])
    with pytest.raises(RecordSizeError, match="over-long"):
        decode_entry(layout, buf + data.draw(st.binary(min_size=1, max_size=8)))


def _with_header(**fields: int) -> bytes:
    """The good record with header fields replaced and the CRC recomputed (isolates each check)."""
    buf = bytearray(_good())
    offsets = {"version": (4, "<H"), "flags": (6, "<H"), "kv": (8, "<B"), "idx": (9, "<B"), "n_parts": (10, "<H"),
               "length": (12, "<I"), "parts_crc": (16, "<I")}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, buf, off, value)
    struct.pack_into("<I", buf, 28, zlib.crc32(bytes(buf[:28]), zlib.crc32(bytes(buf[HEADER_SIZE:]))))
    return bytes(buf)


def test_decoded_values() -> None:
    r = decode_entry(LAYOUT, _good(), expected_model_version=MV, user_id=7)
    np.testing.assert_array_equal(r.arrays["kv.k_user"], np.arange(4, dtype=np.float16).reshape(2, 2))
    assert r.arrays["kv.k_idx"].dtype == np.uint16 and r.arrays["kv.k_idx"].ravel().tolist() == [3, 999]
    assert r.arrays["kv.v_user"].shape == (2, 1)


@pytest.mark.parametrize(("fields", "exc", "msg"), [
    ({"version": 3}, UnsupportedVersionError, "format version 3"),
    ({"kv": 9}, UnknownDtypeError, "does not match the store layout"),
    ({"idx": 2}, UnknownDtypeError, "does not match the store layout"),
    ({"flags": 4}, UnknownDtypeError, "does not match the store layout"),
    ({"n_parts": 3}, UnknownDtypeError, "does not match the store layout"),
    ({"parts_crc": 1}, UnknownDtypeError, "does not match the store layout"),
    ({"length": 3}, RecordSizeError, "truncated"),
    ({"length": 1}, RecordSizeError, "over-long"),
])
def test_header_errors_name_the_user(fields: dict, exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg) as info:
        decode_entry(LAYOUT, _with_header(**fields), user_id=42)
    assert "user 42" in str(info.value) and isinstance(info.value, ValueError)


def test_magic_crc_and_model_version_errors() -> None:
    good = _good()
    with pytest.raises(BadMagicError, match="user 5: bad magic"):
        decode_entry(LAYOUT, b"XKVR" + good[4:], user_id=5)
    with pytest.raises(ChecksumError, match="CRC mismatch"):
        decode_entry(LAYOUT, good[:-1] + bytes([good[-1] ^ 0x10]))
    with pytest.raises(ModelVersionMismatchError, match="user 9: model version 0123456789abcdef"):
        decode_entry(LAYOUT, good, expected_model_version="ffffffffffffffff", user_id=9)
    with pytest.raises(RecordSizeError, match="header"):
        decode_entry(LAYOUT, good[:10])


def test_encode_rejects_wrong_part_shapes() -> None:
    k, v, i = np.zeros((2, 2), np.float16), np.zeros((2, 1), np.float16), np.zeros((2, 1), np.uint16)
    with pytest.raises(RecordSizeError, match=r"user 3: part kv.k_idx has shape \(1, 1\)"):
        encode_entry(LAYOUT, 2, [k, v, i[:1], i], user_id=3)
    with pytest.raises(RecordSizeError, match="3 parts, layout has 4"):
        encode_entry(LAYOUT, 2, [k, v, i])
    with pytest.raises(RecordSizeError, match="max_len"):
        encode_entry(LAYOUT, 51, [k, v, i, i])


def test_bfloat16_raw_bits_view_in_torch() -> None:
    import torch

    layout = din_layout("bfloat16", 3, 3, False, False, max_len=4)
    k = torch.randn(2, 3).to(torch.bfloat16)
    raw = k.view(torch.uint16).numpy()
    r = decode_entry(layout, encode_entry(layout, 2, [raw, raw]))
    assert r.arrays["kv.k_user"].dtype == np.uint16
    assert torch.equal(torch.from_numpy(r.arrays["kv.k_user"].copy()).view(torch.bfloat16), k)


def test_entry_from_parquet_row_verifies() -> None:
    payload = bytes(4) + bytes(2) + b"\x01\x00" + b"\x02\x00"
    row = {"user_id": 11, "length": 1, "payload": payload, "model_version": MV, "checksum": zlib.crc32(payload)}
    buf = entry_from_parquet_row(LAYOUT, **row)
    assert buf[HEADER_SIZE:] == payload and decode_entry(LAYOUT, buf).arrays["kv.k_idx"].ravel().tolist() == [1]
    with pytest.raises(ChecksumError, match="user 11: Parquet checksum"):
        entry_from_parquet_row(LAYOUT, **{**row, "checksum": row["checksum"] ^ 1})
    with pytest.raises(ModelVersionMismatchError, match="user 11"):
        entry_from_parquet_row(LAYOUT, **{**row, "model_version": "f" * 16})
    with pytest.raises(RecordSizeError, match="max_len"):
        entry_from_parquet_row(LAYOUT, **{**row, "length": 51})
    with pytest.raises(RecordSizeError, match="user 11: payload has 10 bytes, layout implies 20"):
        entry_from_parquet_row(LAYOUT, **{**row, "length": 2})


def test_layout_json_round_trip_and_validation(tmp_path: Path) -> None:
    write_layout(tmp_path / "layout.json", LAYOUT)
    assert read_layout(tmp_path / "layout.json") == LAYOUT
    assert "record_format" not in LAYOUT.to_dict() and LAYOUT.to_dict()["layout_version"] == 2
    parts = LAYOUT.parts
    with pytest.raises(LayoutError, match="idx_dtype"):
        EntryLayout("din", "collective", "float16", None, 10, 5, MV, parts)
    with pytest.raises(LayoutError, match="idx_dtype"):
        EntryLayout("din", "full", "float16", "uint16", 10, 5, MV, parts)
    with pytest.raises(LayoutError, match="pool_size"):
        EntryLayout("din", "collective", "float16", "uint16", 70000, 5, MV, parts)
    with pytest.raises(LayoutError, match="model_version"):
        EntryLayout("din", "collective", "float16", "uint16", 10, 5, "ABC", parts)
    with pytest.raises(LayoutError, match="unique"):
        EntryLayout("din", "full", "float16", None, 0, 5, MV, (parts[0], parts[0]))
    (tmp_path / "bad.json").write_text('{"layout_version": 2, "mode": "full"}')
    with pytest.raises(LayoutError, match="missing"):
        read_layout(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(LayoutError, match="not a JSON object"):
        read_layout(tmp_path / "bad.json")


def test_din_layout_has_one_flat_group() -> None:
    g = LAYOUT.flat_group
    assert g is not None and (g.name, g.cap, g.dk, g.dv, g.k_shared, g.v_shared) == ("kv", 50, 2, 1, True, True)
    assert LAYOUT.record_size(3) == HEADER_SIZE + 3 * (2 * 2 + 1 * 2 + 2 + 2)
    np.testing.assert_array_equal(LAYOUT.record_sizes(np.array([0, 3])), [HEADER_SIZE, LAYOUT.record_size(3)])


def test_user_keys_sort_numerically() -> None:
    ids = [0, 1, 255, 256, 2**40, 2**63 - 1]
    assert sorted(user_key(i) for i in ids) == [user_key(i) for i in ids]
    assert [key_user(user_key(i)) for i in ids] == ids
    with pytest.raises(RecordError, match="non-negative"):
        user_key(-1)


def test_empty_entry_encodes() -> None:
    """n = 0 with (0, width) parts (what a prefill of an empty history gives) is a valid record."""
    parts = [np.zeros((0, p.width), LAYOUT.dtype(p.kind)) for p in LAYOUT.parts]
    rec = encode_entry(LAYOUT, 0, parts)
    assert len(rec) == LAYOUT.record_size(0) == HEADER_SIZE and decode_entry(LAYOUT, rec).length == 0
