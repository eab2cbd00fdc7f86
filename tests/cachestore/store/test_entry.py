"""Cache entries (model/entry.py, cachestore/store/entry.py, cachestore/decode/entry_batch.py): every zoo model's
cache → storage arrays → per-user payloads → records → decoded → stacked → cache, and decode from
that equals decode from the model's own cache; key packing; record validation; a din entry is its one
flat K/V group."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.entry_batch import entry_payloads, model_tensors, stack_records, storage_arrays
from collectivekv.cachestore.store.entry import (
    ENTRY_FORMAT_VERSION,
    EntryLayout,
    decode_entry,
    encode_entry,
    entry_from_parquet_row,
    entry_layout,
    read_layout,
)
from collectivekv.cachestore.store.record import (
    BadMagicError,
    ChecksumError,
    ModelVersionMismatchError,
    RecordSizeError,
    UnknownDtypeError,
    UnsupportedVersionError,
    write_layout,
)
from collectivekv.model.cache_spec import entry_bytes, entry_parts
from collectivekv.model.entry import cache_from_arrays, entry_arrays, full_cache, pack_keys, unpack_keys
from collectivekv.model.zoo import PAPER_MODELS
from collectivekv.pipeline.prefill.prefill_engines import cache_layout
from tests.model.zoo_helpers import VARIANTS, make_batch, make_model, zoo_config

VERSION = "0123456789abcdef"
TOL = {"float32": 0.0, "float16": 2e-2, "bfloat16": 8e-2}


def roundtrip(model: torch.nn.Module, layout: EntryLayout, lengths: list[int], seed: int,
              mode: str = "collective") -> tuple[torch.Tensor, torch.Tensor, list[bytes]]:
    """(logits from the model's own cache, logits from the stored records, the records)."""
    cfg = model.cfg
    items, feedback, lens, targets = make_batch(lengths, max(1, max(lengths)), seed)
    cands = torch.stack([targets, targets.flip(0)], 1)  # (B, 2): two candidates per user
    with torch.no_grad():
        cache = model.prefill(items, feedback, lens)
        if mode == "full":
            cache = full_cache(model, cache)
        want = model.decode(cache, cands)
        arrays = storage_arrays(layout, entry_arrays(cache, dataclasses.replace(cfg, kv_mode=(
            "full" if mode == "full" else cfg.kv_mode))))  # fmt: skip
        n = cache.lengths.numpy()
        values, offsets = entry_payloads(layout, arrays, n)
        records = []
        for b in range(len(n)):
            payload = values[offsets[b] : offsets[b + 1]].tobytes()
            records.append(entry_from_parquet_row(layout, user_id=b, length=int(n[b]), payload=payload,
                                                  model_version=VERSION, checksum=zlib.crc32(payload)))
            assert len(records[-1]) == layout.record_size(int(n[b]))
        decoded = [decode_entry(layout, r, expected_model_version=VERSION, user_id=b) for b, r in enumerate(records)]
        lens2, stacked = stack_records(layout, decoded)
        assert np.array_equal(lens2, n)
        tensors = model_tensors(layout, stacked)
        store_cfg = dataclasses.replace(cfg, kv_mode="full") if mode == "full" else cfg
        got = model.decode(cache_from_arrays(tensors, torch.from_numpy(lens2), store_cfg), cands)
    return want, got, records


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_stored_entry_decodes_like_the_model_cache(arch: str, variant: str) -> None:
    cfg = zoo_config(arch, **VARIANTS[variant])
    model = make_model(cfg).eval()
    layout = entry_layout(cfg, VERSION, "collective" if cfg.kv_mode == "collective" else "full", "float32")
    mode = layout.mode
    want, got, records = roundtrip(model, layout, [0, 1, 3, cfg.window_len, cfg.window_len + 4], 1, mode)
    assert torch.equal(want, got)
    # payload bytes == model.zoo.entry_bytes at fp32 for the full model's baseline
    n = min(3, cfg.window_len)
    assert layout.record_size(n) - 32 == entry_bytes(cfg, n, kv_itemsize=4) or cfg.kv_mode == "collective"


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_full_kv_store_of_a_collective_model_decodes_identically(arch: str) -> None:
    cfg = zoo_config(arch)
    model = make_model(cfg).eval()
    layout = entry_layout(cfg, VERSION, "full", "float32")
    assert layout.idx_dtype is None and all(p.kind != "idx" for p in layout.parts)
    want, got, _ = roundtrip(model, layout, [2, 0, cfg.window_len], 3, "full")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(arch=st.sampled_from(PAPER_MODELS), variant=st.sampled_from(sorted(VARIANTS)),
       lengths=st.lists(st.integers(0, 14), min_size=1, max_size=4), dtype=st.sampled_from(sorted(TOL)),
       seed=st.integers(0, 2**16))
def test_entry_roundtrip_property(arch: str, variant: str, lengths: list[int], dtype: str, seed: int) -> None:
    cfg = zoo_config(arch, **VARIANTS[variant])
    model = make_model(cfg, seed).eval()
    mode = "collective" if cfg.kv_mode == "collective" else "full"
    layout = entry_layout(cfg, VERSION, mode, dtype)
    want, got, records = roundtrip(model, layout, lengths, seed, mode)
    if dtype == "float32":
        assert torch.equal(want, got)
    else:
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    for r, n in zip(records, lengths, strict=True):
        assert len(r) == layout.record_size(min(n, cfg.window_len))


def test_collective_entry_bytes_match_the_stored_payload() -> None:
    for arch in PAPER_MODELS:
        cfg = zoo_config(arch)
        layout = entry_layout(cfg, VERSION, "collective", "float16")
        for n in (0, 1, 3, cfg.window_len):
            assert layout.record_size(n) - 32 == entry_bytes(cfg, n, kv_itemsize=2), (arch, n)


@given(bits=st.integers(1, 12), m=st.integers(1, 5), seed=st.integers(0, 999))
def test_pack_keys_roundtrip(bits: int, m: int, seed: int) -> None:
    if m * bits > 63:
        return
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 1 << bits, (3, 5, m), generator=g)
    packed = pack_keys(keys if m > 1 else keys.squeeze(-1), m, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-m * bits // 8))
    back = unpack_keys(packed, m, bits)
    assert torch.equal(back, keys if m > 1 else keys.squeeze(-1))


def test_din_entry_is_one_flat_group() -> None:
    from collectivekv.model.config import CollectiveConfig, ModelConfig

    cfg = ModelConfig(n_items=9, embed_dim=8, d_attn=16, n_heads=2, max_len=6,
                      collective=CollectiveConfig(d_user=2, pool_size=30))  # fmt: skip
    assert [p.name for p in entry_parts(cfg)] == ["kv.k_user", "kv.v_user", "kv.k_idx", "kv.v_idx"]
    layout = cache_layout(cfg, VERSION, "collective", "float16")
    assert layout == entry_layout(cfg, VERSION, "collective", "float16") and layout.arch == "din"
    g = layout.flat_group
    assert g is not None and (g.cap, g.dk, g.dv, g.k_shared, g.v_shared) == (6, 2, 2, True, True)
    rng = np.random.default_rng(0)
    n = 4
    parts = [rng.standard_normal((n, 2)).astype(np.float16), rng.standard_normal((n, 2)).astype(np.float16),
             rng.integers(0, 30, (n, 1)).astype(np.uint16), rng.integers(0, 30, (n, 1)).astype(np.uint16)]
    rec = encode_entry(layout, n, parts)
    assert rec[32:] == b"".join(p.tobytes() for p in parts)  # k_user | v_user | k_idx | v_idx, n rows each
    full = cache_layout(cfg, VERSION, "full", "float16")
    assert full.flat_group is not None and full.flat_group.dk == 16 and full.idx_dtype is None
    assert all(entry_layout(zoo_config(a), VERSION).flat_group is None for a in PAPER_MODELS)


def test_layout_json_roundtrip_and_dispatch(tmp_path) -> None:
    layout = entry_layout(zoo_config("sdim"), VERSION)
    write_layout(tmp_path / "layout.json", layout)
    assert read_layout(tmp_path / "layout.json") == layout
    assert "long.k_user" not in [p.name for p in layout.parts]  # SDIM's long stage caches V only


def test_bad_records_are_refused_naming_the_user() -> None:
    cfg = zoo_config("eta")
    layout = entry_layout(cfg, VERSION, "collective", "float16")
    rng = np.random.default_rng(1)
    n = 3
    parts = [np.zeros((min(n, p.cap), p.width), layout.dtype(p.kind)) + (rng.integers(0, 5) if p.kind != "kv" else 0)
             for p in layout.parts]  # fmt: skip
    rec = encode_entry(layout, n, parts, user_id=7)
    assert decode_entry(layout, rec).length == n
    assert int.from_bytes(rec[4:6], "little") == ENTRY_FORMAT_VERSION
    with pytest.raises(BadMagicError, match="user 7"):
        decode_entry(layout, b"XXXX" + rec[4:], user_id=7)
    with pytest.raises(UnsupportedVersionError):
        decode_entry(layout, rec[:4] + b"\x01\x00" + rec[6:], user_id=7)
    with pytest.raises(RecordSizeError, match="truncated"):
        decode_entry(layout, rec[:-1], user_id=7)
    flipped = bytearray(rec)
    flipped[-1] ^= 1
    with pytest.raises(ChecksumError, match="user 7"):
        decode_entry(layout, bytes(flipped), user_id=7)
    with pytest.raises(ModelVersionMismatchError):
        decode_entry(layout, rec, expected_model_version="f" * 16, user_id=7)
    other = entry_layout(dataclasses.replace(cfg, hash_bits=16), VERSION, "collective", "float16")
    with pytest.raises(UnknownDtypeError, match="does not match the store layout"):
        decode_entry(other, rec, user_id=7)
    with pytest.raises(RecordSizeError, match="shape"):
        encode_entry(layout, n + 1, parts, user_id=7)
    with pytest.raises(ChecksumError, match="user 9"):
        entry_from_parquet_row(layout, user_id=9, length=n, payload=rec[32:], model_version=VERSION, checksum=1)
