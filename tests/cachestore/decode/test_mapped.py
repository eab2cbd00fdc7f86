"""Zero-copy fetch (cachestore/decode/mapped.py): the batch a MappedBatcher describes, gathered from the LMDB map,
is byte for byte the batch HostBatcher.fetch copies (CPU reference and, under Triton's interpreter or on
CUDA, the gather kernel); bad records are refused naming the user; the CUDA graph scores it alike."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode import mapped
from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import ResidentModel
from collectivekv.cachestore.decode.fused import fused_available
from collectivekv.cachestore.decode.graphs import GraphedDecoder
from collectivekv.cachestore.decode.mapped import (
    MappedBatcher,
    gather_records,
    gather_reference,
    launch_gather,
    value_addresses,
)
from collectivekv.cachestore.store.entry import encode_entry
from collectivekv.cachestore.store.publish import LAYOUT, LMDB_DIR, open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import ModelVersionMismatchError, RecordError, user_key, write_layout
from tests.model.test_model import N_ITEMS, make_model, small_config
from tests.store_fixtures import store_of_model

VERSION = "0123456789abcdef"
SEQ = 8  # small_config max_len
USERS = list(range(100, 112))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Collective stores (fp16, fp32) of users 100..111 with lengths 0, 1, L among them."""
    model = make_model(small_config(kv_mode="collective"), seed=1).eval()
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, SEQ + 1, (len(USERS),), generator=g)
    lengths[:3] = torch.tensor([0, 1, SEQ])
    items = torch.randint(1, N_ITEMS + 1, (len(USERS), SEQ), generator=g)
    feedback = torch.randint(1, 3, (len(USERS), SEQ), generator=g)
    pad = torch.arange(SEQ).unsqueeze(0) >= lengths.unsqueeze(1)
    items[pad], feedback[pad] = 0, 0
    readers = {}
    for kv_dtype in ("float16", "float32"):
        root = tmp_path_factory.mktemp(f"mapped-{kv_dtype}")
        store_of_model(root, model, VERSION, USERS, items, feedback, lengths, "collective", kv_dtype)
        readers[kv_dtype] = StoreReader(open_current(root))
    return {"model": model, "readers": readers}


def both(reader: StoreReader, ids: list[int], n_slots: int | None = None):
    copied = HostBatcher(reader.layout, reader=reader, pin=False).fetch(ids, n_slots)
    described = MappedBatcher(reader.layout, reader=reader, pin=False).fetch(ids, n_slots)
    return copied, described


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.sampled_from([*USERS, 7, 99999]), min_size=0, max_size=12), pad=st.integers(0, 3),
       kv_dtype=st.sampled_from(["float16", "float32"]))
def test_gathered_batch_equals_copied_batch(store: dict, ids: list[int], pad: int, kv_dtype: str) -> None:
    """Any users (absent, repeated, none; padded with cold slots): the gathered bytes == the copied batch."""
    copied, described = both(store["readers"][kv_dtype], ids, len(ids) + pad)
    for name in ("user_ids", "lengths", "offsets", "present"):
        assert getattr(described, name).tolist() == getattr(copied, name).tolist(), name
    assert (described.cold_start, described.max_length, described.used_bytes, described.record_bytes) == (
        copied.cold_start, copied.max_length, copied.used_bytes, copied.record_bytes)
    raw = torch.full((described.used_bytes + 16,), 0xAB, dtype=torch.uint8)  # stale bytes everywhere
    gather_records(described, raw)
    assert_same_batch(raw, copied)


def assert_same_batch(raw: torch.Tensor, copied) -> None:
    """raw holds the copied batch: header, zero block and every record (padding between records aside)."""
    got, want = raw.cpu().numpy(), copied.tensor.numpy()
    head = copied.zero_offset + (int(copied.offsets[copied.present].min()) - copied.zero_offset
                                 if copied.present.any() else len(want) - copied.zero_offset)
    assert got[:head].tobytes() == want[:head].tobytes()  # offsets, lengths, zero block
    for b in np.flatnonzero(copied.present):
        o, n = int(copied.offsets[b]), len(copied.record(int(b)))
        assert got[o : o + n].tobytes() == want[o : o + n].tobytes()


@pytest.mark.skipif(not fused_available("cpu") and not torch.cuda.is_available(), reason="needs Triton")
@pytest.mark.parametrize("unit", [8, 4, 2, 1])
@pytest.mark.parametrize("split", [False, True])
def test_gather_kernel_equals_reference(unit: int, split: bool) -> None:
    """The Triton kernel (interpreted on CPU, compiled on CUDA) copies what the table says, at any word size:
    empty rows, rows of one word, rows longer than a loop step; split: two launches over byte ranges
    (records ending in (-1, cut], then (cut, 2^62]) copy every row exactly once."""
    rng = np.random.default_rng(unit)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = torch.from_numpy(rng.integers(0, 256, 64 << 10, dtype=np.uint8))
    units = np.array([0, 1, 3, 1500 // unit * 2, 17, 0, 9])  # (B,) words per row
    src = rng.integers(0, (len(source) - 3000) // unit, len(units))  # word offsets in the source
    dst = np.cumsum(units) - units + 5  # (B,) word offsets in the output
    table = torch.from_numpy(np.stack([src, dst, units]).astype(np.int64))  # (3, B)
    out = torch.zeros((int(dst[-1] + units[-1] + 8) * unit,), dtype=torch.uint8)
    want = out.clone().numpy()
    for s, d, n in table.T.tolist():
        want[d * unit : (d + n) * unit] = source.numpy()[s * unit : (s + n) * unit]
    if device.type == "cuda":
        source_in, table, out = source.pin_memory(), table.to(device), out.to(device)  # pinned: GPU-readable
        host_source = mapped._HostPointer(source_in.data_ptr(), mapped._UNIT_DTYPES[unit])
    else:
        host_source = source.view(mapped._UNIT_DTYPES[unit])
    ends = [(-1, 1 << 62)]
    if split:
        cut = int(dst[3] + units[3]) * unit // 8 * 8 + 8  # 8-aligned, after row 3's end
        ends = [(-1, cut), (cut, 1 << 62)]
    for lo_hi in ends:
        launch_gather(host_source, table, out, unit, int(units.max()) * unit, lo_hi)
    assert out.cpu().numpy().tobytes() == want.tobytes()


def test_addresses_fast_path_equals_exact(store: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = store["readers"]["float16"]
    batcher = MappedBatcher(reader.layout, reader=reader, pin=False)
    smap = batcher.store_map
    smap.array  # noqa: B018 - locates the map
    with smap._env.begin(buffers=True) as txn:
        values = [txn.get(user_key(u)) for u in USERS]
        fast, sizes = value_addresses(values, smap.base, smap.base + smap.nbytes)
        assert sizes.tolist() == [len(v) for v in values]
        monkeypatch.setattr(mapped, "_BUF_OFFSET", None)
        assert value_addresses(values, smap.base, smap.base + smap.nbytes)[0].tolist() == fast.tolist()
        assert mapped._BUF_OFFSET is None and fast.min() >= smap.base
        with pytest.raises(ValueError, match="outside the store's map"):
            value_addresses(values, smap.base + smap.nbytes, smap.base + 2 * smap.nbytes)


def test_bad_records_are_refused_naming_the_user(store: dict, tmp_path: Path) -> None:
    layout = store["readers"]["float16"].layout
    other = dataclasses.replace(layout, model_version="fedcba9876543210")
    k_part = layout.parts[0]
    wider = dataclasses.replace(layout, parts=(dataclasses.replace(k_part, width=k_part.width + 1), *layout.parts[1:]))
    vdir = tmp_path / "version"
    (vdir / LMDB_DIR).mkdir(parents=True)
    write_layout(vdir / LAYOUT, layout)
    env = lmdb.open(str(vdir / LMDB_DIR), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for uid, lay in ((1, layout), (2, other), (3, wider)):
            txn.put(user_key(uid), encode_entry(lay, 3, [np.ones((3, p.width), lay.dtype(p.kind)) for p in lay.parts]))
        txn.put(user_key(4), b"CKVR" + b"\0" * 10)  # truncated
    env.close()
    batcher = MappedBatcher(layout, reader=StoreReader(vdir), pin=False)
    assert batcher.fetch([1, 5]).lengths.tolist() == [3, 0]
    with pytest.raises(ModelVersionMismatchError, match="user 2: model version fedcba9876543210 != expected"):
        batcher.fetch([1, 2])
    with pytest.raises(RecordError, match="user 3: .*does not match the store layout"):
        batcher.fetch([3])
    with pytest.raises(RecordError, match="user 4"):
        batcher.fetch([4])
    with pytest.raises(ModelVersionMismatchError):
        MappedBatcher(layout, reader=StoreReader(vdir), expected_model_version="fedcba9876543210")


def test_batch_goes_stale_when_its_buffer_is_reused(store: dict) -> None:
    reader = store["readers"]["float16"]
    batcher = MappedBatcher(reader.layout, reader=reader, pin=False, n_buffers=2)
    first = batcher.fetch(USERS[:3])
    batcher.fetch(USERS[3:6])
    gather_reference(first, torch.zeros(first.used_bytes, dtype=torch.uint8))  # still valid
    batcher.fetch(USERS[6:9])
    with pytest.raises(RuntimeError, match="stale"):
        gather_reference(first, torch.zeros(first.used_bytes, dtype=torch.uint8))


def test_graphed_decoder_scores_a_mapped_batch_like_a_copied_one(store: dict) -> None:
    """The static decode over the gathered batch (eager on CPU; replayed graph on CUDA) == over the copied one."""
    reader = store["readers"]["float16"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resident = ResidentModel(store["model"], device)
    ids = [105, 7, 100, 101, 111, 100]
    kw = dict(n_users=8, pad_to=SEQ, n_candidates=2, eager=device == "cpu")
    with torch.inference_mode():
        copy_graph, zero_copy_graph = GraphedDecoder(resident, reader.layout, **kw), \
            GraphedDecoder(resident, reader.layout, **kw)
    pin = device == "cuda"
    copying = HostBatcher(reader.layout, reader=reader, pin=pin)
    describing = MappedBatcher(reader.layout, reader=reader, pin=pin)
    rng = np.random.default_rng(0)
    for round_ids in (ids, ids[::-1], ids[2:]):
        cand = rng.integers(1, N_ITEMS + 1, (8, 2))
        want = copy_graph.run(copying.fetch(round_ids, 8), cand).clone()
        got = zero_copy_graph.run(describing.fetch(round_ids, 8), cand).clone()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert zero_copy_graph.last_cost is not None and zero_copy_graph.last_cost.ms >= 0
    describing.close()


@pytest.mark.cuda
@cuda
def test_cuda_gather_from_the_registered_map(store: dict) -> None:
    """On CUDA the records are read from the registered LMDB map: bytes equal the copied batch."""
    reader = store["readers"]["float32"]
    copied, described = both(reader, [*USERS, 7], 16)
    raw = torch.zeros(described.used_bytes + 8, dtype=torch.uint8, device="cuda")
    gather_records(described, raw)
    assert_same_batch(raw, copied)
    described.store_map.close()
