"""The binary record format (cachestore/record.py): round trips, corruption, layout JSON."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachestore.entry import read_layout
from cachestore.record import (
    HEADER_SIZE,
    BadMagicError,
    CacheLayout,
    ChecksumError,
    LayoutError,
    ModelVersionMismatchError,
    RecordError,
    RecordSizeError,
    UnknownDtypeError,
    UnsupportedVersionError,
    decode_record,
    encode_record,
    key_user,
    payload_checksum,
    record_from_parquet_row,
    user_key,
    write_layout,
)

MV = "0123456789abcdef"
KV_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
IDX_SIZE = {"uint16": 2, "int32": 4, None: 0}


@st.composite
def layouts(draw: st.DrawFn) -> CacheLayout:
    kv = draw(st.sampled_from(sorted(KV_SIZE)))
    if draw(st.booleans()):
        d = draw(st.integers(1, 6))
        return CacheLayout("full", kv, None, d, d, False, False, 0, 64, draw(st.sampled_from([MV, "f" * 16])))
    k_sh, v_sh = draw(st.booleans()), draw(st.booleans())
    idx = draw(st.sampled_from(["uint16", "int32"])) if (k_sh or v_sh) else None
    return CacheLayout("collective", kv, idx, draw(st.integers(1, 4)), draw(st.integers(1, 4)),
                       k_sh, v_sh, 1000, 64, MV)


@st.composite
def records(draw: st.DrawFn) -> tuple[CacheLayout, dict]:
    layout = draw(layouts())
    n = draw(st.integers(0, 5))
    kv, idx = KV_SIZE[layout.kv_dtype], IDX_SIZE[layout.idx_dtype]
    parts = {
        "length": n,
        "k_user": draw(st.binary(min_size=n * layout.dk * kv, max_size=n * layout.dk * kv)),
        "v_user": draw(st.binary(min_size=n * layout.dv * kv, max_size=n * layout.dv * kv)),
        "k_idx": draw(st.binary(min_size=n * idx, max_size=n * idx)) if layout.k_shared else b"",
        "v_idx": draw(st.binary(min_size=n * idx, max_size=n * idx)) if layout.v_shared else b"",
    }
    return layout, parts


@settings(max_examples=200, deadline=None)
@given(records())
def test_round_trip(rec: tuple[CacheLayout, dict]) -> None:
    layout, parts = rec
    buf = encode_record(layout, **parts)
    assert len(buf) == layout.record_size(parts["length"])
    r = decode_record(buf, expected_model_version=layout.model_version)
    assert (r.length, r.dk, r.dv, r.kv_dtype, r.idx_dtype, r.k_shared, r.v_shared, r.model_version) == (
        parts["length"], layout.dk, layout.dv, layout.kv_dtype, layout.idx_dtype, layout.k_shared,
        layout.v_shared, layout.model_version)
    assert r.k_user.shape == (parts["length"], layout.dk)
    assert r.v_user.shape == (parts["length"], layout.dv)
    assert r.k_user.tobytes() == parts["k_user"] and r.v_user.tobytes() == parts["v_user"]
    for side in ("k", "v"):
        arr = getattr(r, f"{side}_idx")
        if getattr(layout, f"{side}_shared"):
            assert arr.shape == (parts["length"],) and arr.tobytes() == parts[f"{side}_idx"]
        else:
            assert arr is None
    assert not r.k_user.flags.writeable


@settings(max_examples=100, deadline=None)
@given(records(), st.data())
def test_any_single_byte_corruption_is_detected(rec: tuple[CacheLayout, dict], data: st.DataObject) -> None:
    buf = bytearray(encode_record(rec[0], **rec[1]))
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RecordError):
        decode_record(bytes(buf))


def test_every_bit_flip_of_one_record_is_detected() -> None:
    layout = CacheLayout("collective", "float16", "uint16", 1, 1, True, True, 10, 8, MV)
    rng = np.random.default_rng(0)
    buf = encode_record(layout, length=3, k_user=rng.bytes(6), v_user=rng.bytes(6),
                        k_idx=rng.bytes(6), v_idx=rng.bytes(6))
    for pos in range(len(buf)):
        for bit in range(8):
            bad = bytearray(buf)
            bad[pos] ^= 1 << bit
            with pytest.raises(RecordError):
                decode_record(bad)


@settings(max_examples=100, deadline=None)
@given(records(), st.data())
def test_truncation_and_extension_are_detected(rec: tuple[CacheLayout, dict], data: st.DataObject) -> None:
    buf = encode_record(rec[0], **rec[1])
    cut = data.draw(st.integers(0, len(buf) - 1))
    with pytest.raises(RecordSizeError, match="truncated"):
        decode_record(buf[:cut])
    with pytest.raises(RecordSizeError, match="over-long"):
        decode_record(buf + data.draw(st.binary(min_size=1, max_size=8)))


LAYOUT = CacheLayout("collective", "float16", "uint16", 2, 1, True, True, 1000, 50, MV)


def _good() -> bytes:
    return encode_record(LAYOUT, length=2, k_user=np.arange(4, dtype=np.float16),
                         v_user=np.arange(2, dtype=np.float16), k_idx=np.array([3, 999], np.uint16),
                         v_idx=np.array([0, 1], np.uint16), user_id=7)


def _with_header(**fields: int) -> bytes:
    """The good record with header fields replaced and the CRC recomputed (isolates each check)."""
    buf = bytearray(_good())
    offsets = {"version": (4, "<H"), "flags": (6, "<H"), "kv": (8, "<B"), "idx": (9, "<B"),
               "reserved": (10, "<H"), "length": (12, "<I")}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, buf, off, value)
    struct.pack_into("<I", buf, 28, zlib.crc32(bytes(buf[:28]), zlib.crc32(bytes(buf[HEADER_SIZE:]))))
    return bytes(buf)


def test_decoded_values_and_numpy_inputs() -> None:
    r = decode_record(_good(), expected_model_version=MV, user_id=7)
    np.testing.assert_array_equal(r.k_user, np.arange(4, dtype=np.float16).reshape(2, 2))
    assert r.k_idx.dtype == np.uint16 and r.k_idx.tolist() == [3, 999]
    assert r.v_user.shape == (2, 1)


@pytest.mark.parametrize(("fields", "exc", "msg"), [
    ({"version": 2}, UnsupportedVersionError, "format version 2"),
    ({"kv": 9}, UnknownDtypeError, "kv dtype code 9"),
    ({"idx": 7}, UnknownDtypeError, "idx dtype code 7"),
    ({"idx": 0}, UnknownDtypeError, "inconsistent"),
    ({"flags": 4}, UnknownDtypeError, "undefined header bits"),
    ({"reserved": 1}, UnknownDtypeError, "undefined header bits"),
    ({"length": 3}, RecordSizeError, "truncated"),
    ({"length": 1}, RecordSizeError, "over-long"),
])
def test_header_errors_name_the_user(fields: dict, exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg) as info:
        decode_record(_with_header(**fields), user_id=42)
    assert "user 42" in str(info.value) and isinstance(info.value, ValueError)


def test_magic_crc_and_model_version_errors() -> None:
    good = _good()
    with pytest.raises(BadMagicError, match="user 5: bad magic"):
        decode_record(b"XKVR" + good[4:], user_id=5)
    with pytest.raises(ChecksumError, match="CRC mismatch"):
        decode_record(good[:-1] + bytes([good[-1] ^ 0x10]))
    with pytest.raises(ModelVersionMismatchError, match="user 9: model version 0123456789abcdef"):
        decode_record(good, expected_model_version="ffffffffffffffff", user_id=9)
    assert decode_record(good, expected_model_version=bytes.fromhex(MV)).length == 2
    with pytest.raises(RecordSizeError, match="header"):
        decode_record(good[:10])


def test_encode_rejects_wrong_part_sizes() -> None:
    with pytest.raises(RecordSizeError, match="user 3: k_idx has 2 bytes, layout implies 4"):
        encode_record(LAYOUT, length=2, k_user=bytes(8), v_user=bytes(4), k_idx=bytes(2),
                      v_idx=bytes(4), user_id=3)
    unshared = CacheLayout("collective", "float16", "uint16", 1, 1, True, False, 10, 5, MV)
    with pytest.raises(RecordSizeError, match="v_idx"):
        encode_record(unshared, length=1, k_user=bytes(2), v_user=bytes(2), k_idx=bytes(2), v_idx=bytes(2))


def test_bfloat16_raw_bits_view_in_torch() -> None:
    import torch
    layout = CacheLayout("full", "bfloat16", None, 3, 3, False, False, 0, 4, MV)
    k = torch.randn(2, 3).to(torch.bfloat16)
    raw = k.view(torch.uint16).numpy().tobytes()
    r = decode_record(encode_record(layout, length=2, k_user=raw, v_user=raw))
    assert r.k_user.dtype == np.uint16
    assert torch.equal(torch.from_numpy(r.k_user.copy()).view(torch.bfloat16), k)


def test_record_from_parquet_row_verifies() -> None:
    row = {"user_id": 11, "length": 1, "k_user": bytes(4), "v_user": bytes(2), "k_idx": b"\x01\x00",
           "v_idx": b"\x02\x00", "model_version": MV}
    row["checksum"] = zlib.crc32(row["k_user"] + row["v_user"] + row["k_idx"] + row["v_idx"])
    assert row["checksum"] == payload_checksum(row["k_user"], row["v_user"], row["k_idx"], row["v_idx"])
    buf = record_from_parquet_row(LAYOUT, **row)
    assert decode_record(buf).k_idx.tolist() == [1]
    with pytest.raises(ChecksumError, match="user 11: Parquet checksum"):
        record_from_parquet_row(LAYOUT, **{**row, "checksum": row["checksum"] ^ 1})
    with pytest.raises(ModelVersionMismatchError, match="user 11"):
        record_from_parquet_row(LAYOUT, **{**row, "model_version": "f" * 16})
    with pytest.raises(RecordSizeError, match="max_len"):
        record_from_parquet_row(LAYOUT, **{**row, "length": 51})


def test_layout_json_round_trip_and_validation(tmp_path: Path) -> None:
    write_layout(tmp_path / "layout.json", LAYOUT)
    assert read_layout(tmp_path / "layout.json") == LAYOUT
    with pytest.raises(LayoutError, match="idx_dtype"):
        CacheLayout("collective", "float16", None, 1, 1, True, True, 10, 5, MV)
    with pytest.raises(LayoutError, match="full"):
        CacheLayout("full", "float16", None, 4, 8, False, False, 0, 5, MV)
    with pytest.raises(LayoutError, match="pool_size"):
        CacheLayout("collective", "float16", "uint16", 1, 1, True, True, 70000, 5, MV)
    with pytest.raises(LayoutError, match="model_version"):
        CacheLayout("collective", "float16", "uint16", 1, 1, True, True, 10, 5, "ABC")
    (tmp_path / "bad.json").write_text('{"mode": "full"}')
    with pytest.raises(LayoutError, match="missing"):
        read_layout(tmp_path / "bad.json")


def test_user_keys_sort_numerically() -> None:
    ids = [0, 1, 255, 256, 2**40, 2**63 - 1]
    assert sorted(user_key(i) for i in ids) == [user_key(i) for i in ids]
    assert [key_user(user_key(i)) for i in ids] == ids
    with pytest.raises(RecordError, match="non-negative"):
        user_key(-1)


def test_record_from_parquet_row_accepts_buffers_and_checks_sizes() -> None:
    k, v = np.array([[1.0, 2.0]], np.float16), np.array([[3.0]], np.float16)
    ki, vi = np.array([5], np.uint16), memoryview(np.array([6], np.uint16))
    crc = payload_checksum(k, v, ki, vi)
    row = {"user_id": 4, "length": 1, "k_user": k, "v_user": v, "k_idx": ki, "v_idx": vi,
           "model_version": MV, "checksum": crc}
    rec = decode_record(record_from_parquet_row(LAYOUT, **row))
    assert rec.k_user.tolist() == [[1.0, 2.0]] and rec.v_idx.tolist() == [6]
    with pytest.raises(ChecksumError, match="user 4"):
        record_from_parquet_row(LAYOUT, **{**row, "checksum": crc + 1})
    with pytest.raises(RecordSizeError, match="user 4: v_user has 4 bytes, layout implies 2"):
        record_from_parquet_row(LAYOUT, **{**row, "v_user": bytes(4)})


def test_empty_numpy_parts_encode() -> None:
    """n = 0 with (0, d) numpy parts (what a prefill of an empty history gives) is a valid record."""
    layout = CacheLayout("collective", "float16", "uint16", 2, 3, True, True, 10, 5, "0123456789abcdef")
    rec = encode_record(layout, length=0, k_user=np.zeros((0, 2), np.float16), v_user=np.zeros((0, 3), np.float16),
                        k_idx=np.zeros(0, np.uint16), v_idx=np.zeros(0, np.uint16))  # fmt: skip
    assert len(rec) == layout.record_size(0) and decode_record(rec).length == 0
