"""Host pack → device copy → unpack of store records: din records of every kv dtype, index width and sharing,
and zoo records of every model (also with ``pad_to``), equal the stored parts with zeros at padding and for
cold-start users; the unpacked din group is the padded KVCache of the stored parts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.batch import HostBatcher, zero_block_bytes
from collectivekv.cachestore.decode.entry_batch import stack_records
from collectivekv.cachestore.decode.transfer import EntryBatch, to_device
from collectivekv.cachestore.store.entry import EntryLayout, decode_entry, encode_entry, entry_layout
from collectivekv.model.cache import KVCache
from collectivekv.model.config import CollectiveConfig
from collectivekv.model.zoo import PAPER_MODELS
from tests.cachestore.decode.serving_helpers import VERSION
from tests.cachestore.store.test_record import din_layout
from tests.model.zoo_helpers import zoo_config

LAYOUTS = st.builds(
    lambda kv, idx, share, dk, dv: din_layout(kv, dk, dv, share in ("both", "k"), share in ("both", "v"), idx,
                                              pool_size=300, max_len=9, model_version=VERSION),
    st.sampled_from(["float16", "bfloat16", "float32"]), st.sampled_from(["uint16", "int32"]),
    st.sampled_from(["both", "k", "v"]), st.integers(1, 5), st.integers(1, 5))


@given(layout=LAYOUTS, seed=st.integers(0, 999))
@settings(max_examples=30, deadline=None)
def test_pack_transfer_unpack_round_trip(layout: EntryLayout, seed: int) -> None:
    rng = np.random.default_rng(seed)
    kv = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[layout.kv_dtype]
    idx_dt = np.uint16 if layout.idx_dtype == "uint16" else np.int32
    g = layout.flat_group
    ids, recs, parts = [], [], []
    for u in range(int(rng.integers(1, 7))):
        n = int(rng.integers(0, layout.max_len + 1))
        absent = rng.random() < 0.25
        k = rng.standard_normal((n, g.dk)).astype(np.float32)
        v = rng.standard_normal((n, g.dv)).astype(np.float32)
        if layout.kv_dtype == "bfloat16":  # raw bits of bf16 values
            k, v = (torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16) for x in (k, v))
        else:
            k, v = k.astype(kv), v.astype(kv)
        ki = rng.integers(0, 300, n).astype(idx_dt) if g.k_shared else None
        vi = rng.integers(0, 300, n).astype(idx_dt) if g.v_shared else None
        ids.append(u * 7)
        stored = [k, v, *(i[:, None] for i in (ki, vi) if i is not None)]  # the din parts in layout order
        recs.append(None if absent else encode_entry(layout, n, stored))
        parts.append(None if absent else (k, v, ki, vi))
    batcher = HostBatcher(layout, pin=False, capacity_bytes=64)  # tiny: exercises growth
    host = batcher.pack(ids, recs)
    assert host.cold_start == sum(p is None for p in parts)
    dev, cost = to_device(host, "cpu")
    assert cost.bytes == host.used_bytes and cost.ms >= 0
    batch = dev.unpack()
    a = batch.arrays
    length = a["kv.k_user"].shape[1]
    for b, p in enumerate(parts):
        n = 0 if p is None else len(p[0])
        assert int(batch.lengths[b]) == n
        got = [a["kv.k_user"][b], a["kv.v_user"][b], *(a[f"kv.{s}_idx"].squeeze(-1) if f"kv.{s}_idx" in a else None
                                                       for s in "kv")]
        if layout.kv_dtype == "bfloat16":
            got[:2] = [t.view(torch.int16).numpy().view(np.uint16) for t in got[:2]]
        else:
            got[:2] = [t.numpy() for t in got[:2]]
        for j in range(2):
            assert (got[j][n:] == 0).all()
            if p is not None:
                np.testing.assert_array_equal(got[j][:n], p[j])
        for j, shared in ((2, g.k_shared), (3, g.v_shared)):
            if not shared:
                assert got[j] is None
                continue
            row = got[j][b].numpy()
            assert row.shape == (length,) and (row[n:] == 0).all()
            if p is not None:
                np.testing.assert_array_equal(row[:n], p[j].astype(np.int64))


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_pack_transfer_unpack_entry_round_trip(arch: str) -> None:
    """Random records of every kv dtype and index width → pack → copy → unpack == the decoded records
    stacked on the host (cachestore.decode.entry_batch.stack_records), padding zero, also with pad_to."""
    rng = np.random.default_rng(PAPER_MODELS.index(arch))
    for kv_dtype in ("float16", "bfloat16", "float32"):
        layout = entry_layout(zoo_config(arch), VERSION, "collective", kv_dtype)
        for lay in (layout, dataclasses.replace(layout, idx_dtype="int32", pool_size=100_000)):
            ids, recs = [], []
            for u in range(int(rng.integers(1, 7))):
                n = int(rng.integers(0, lay.max_len + 1))
                parts = []
                for p in lay.parts:
                    shape = (min(n, p.cap), p.width)
                    hi = {"kv": 1 << 16, "idx": lay.pool_size, "key": 256}[p.kind]
                    a = rng.integers(0, hi, shape)
                    if p.kind == "kv" and kv_dtype == "float32":
                        a = rng.standard_normal(shape)
                    elif p.kind == "kv" and kv_dtype == "float16":
                        a = rng.standard_normal(shape).astype(np.float16)
                    parts.append(np.asarray(a).astype(lay.dtype(p.kind)))
                ids.append(u * 3)
                recs.append(None if rng.random() < 0.25 else encode_entry(lay, n, parts))
            host = HostBatcher(lay, pin=False, capacity_bytes=64).pack(ids, recs)  # tiny: grows
            assert host.cold_start == sum(r is None for r in recs)
            dev, cost = to_device(host, "cpu")
            assert cost.bytes == host.used_bytes and zero_block_bytes(lay) == max(8, *lay.row_bytes) + 7 & ~7
            decoded = [None if r is None else decode_entry(lay, r) for r in recs]
            lengths, want = stack_records(lay, decoded)
            for pad_to in (None, lay.max_len + 2):
                got = dev.unpack(pad_to)
                assert isinstance(got, EntryBatch) and got.lengths.tolist() == lengths.tolist()
                for p in lay.parts:
                    t = got.arrays[p.name]
                    rows = max(1, min(p.cap, host.max_length if pad_to is None else pad_to))
                    assert t.shape == (len(ids), rows, p.width), (p, t.shape)
                    if p.kind == "kv":
                        raw = t.view(torch.int16).numpy().view(np.uint16) if kv_dtype == "bfloat16" else t.numpy()
                    else:
                        assert t.dtype == (torch.int64 if p.kind == "idx" else torch.uint8)
                        raw = t.numpy()
                    r = want[p.name].shape[1]
                    np.testing.assert_array_equal(raw[:, :r], want[p.name].astype(raw.dtype), err_msg=p.name)
                    assert (raw[:, r:] == 0).all()


def test_unpacked_din_group_is_a_kv_cache() -> None:
    """The unpack of the din arch's parts, through ``cachestore.decode.decode.din_cache``, is the padded KVCache of
    the stored parts (zeros and index 0 at padding; cold start: length 0)."""
    from collectivekv.cachestore.decode.decode import din_cache
    from collectivekv.model.config import ModelConfig
    from collectivekv.model.entry import cache_from_arrays

    cfg = ModelConfig(n_items=9, embed_dim=8, d_attn=16, n_heads=2, max_len=6,
                      collective=CollectiveConfig(d_user=2, pool_size=30))  # fmt: skip
    layout = entry_layout(cfg, VERSION, "collective", "float16")
    rng = np.random.default_rng(5)
    recs, stored = [], []
    for n in (0, 4, 6, 2):
        parts = [rng.standard_normal((n, 2)).astype(np.float16), rng.standard_normal((n, 2)).astype(np.float16),
                 rng.integers(0, 30, (n, 1)).astype(np.uint16), rng.integers(0, 30, (n, 1)).astype(np.uint16)]
        recs.append(encode_entry(layout, n, parts))
        stored.append(parts)
    batch = to_device(HostBatcher(layout, pin=False).pack([1, 2, 3, 4, 5], [*recs, None]), "cpu")[0].unpack()
    assert isinstance(batch, EntryBatch)
    kv = din_cache(batch)
    whole = cache_from_arrays(batch.arrays, batch.lengths, cfg).kv["kv"]  # what the helper shortcuts
    for name in ("k_user", "v_user", "k_idx", "v_idx", "lengths"):
        assert torch.equal(getattr(kv, name), getattr(whole, name)), name
    assert isinstance(kv, KVCache) and kv.lengths.tolist() == [0, 4, 6, 2, 0] and kv.k_user.shape == (5, 6, 2)
    assert kv.k_idx.dtype == torch.int64 and kv.k_idx.shape == (5, 6)
    for b, parts in enumerate(stored):
        n = len(parts[0])
        for got, want in ((kv.k_user[b], parts[0]), (kv.v_user[b], parts[1]), (kv.k_idx[b], parts[2][:, 0]),
                          (kv.v_idx[b], parts[3][:, 0])):
            np.testing.assert_array_equal(got[:n].numpy(), want)
            assert (got[n:] == 0).all()
    assert (kv.k_user[4] == 0).all() and (kv.v_idx[4] == 0).all()
