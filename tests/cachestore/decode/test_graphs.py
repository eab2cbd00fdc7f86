"""CUDA-graph decode (cachestore/decode/graphs.py): the captured body `static_decode` against the regular
unpack + decode on CPU, the static-buffer decoder (eager on CPU, replayed graph on CUDA), cold-slot
padding of fetched batches, and the runtime's graphs option."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.capture import read_pinned
from collectivekv.cachestore.decode.decode import ResidentModel, decode, din_cache
from collectivekv.cachestore.decode.entry_batch import kv_storage
from collectivekv.cachestore.decode.graphs import GraphedDecoder, batch_capacity, copy_buckets, static_decode
from collectivekv.cachestore.decode.mapped import MappedBatcher
from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.decode.transfer import to_device
from collectivekv.cachestore.store.entry import EntryLayout, encode_entry
from collectivekv.cachestore.store.publish import open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.model.config import CollectiveConfig
from tests.model.test_model import N_ITEMS, make_model, small_config
from tests.store_fixtures import layout_for, store_of_model

VERSION = "0123456789abcdef"
SEQ = 8  # small_config max_len
MODELS = {  # name -> (config overrides, store mode)
    "collective": (dict(kv_mode="collective"), "collective"),
    "share_k_only": (dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_v=False)), "collective"),
    "share_v_only": (dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_k=False)), "collective"),
    "user_dims_span_heads": (dict(collective=CollectiveConfig(d_user=11, pool_size=12)), "collective"),
    "full_store": (dict(kv_mode="collective"), "full"),
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_records(layout: EntryLayout, lengths: list[int | None], rng: np.random.Generator) -> list[bytes | None]:
    """Encoded records with N(0,1) user parts and uniform pool indices; None = cold start."""
    g = layout.flat_group
    recs: list[bytes | None] = []
    for n in lengths:
        if n is None:
            recs.append(None)
            continue
        k = kv_storage(torch.from_numpy(rng.standard_normal((n, g.dk)).astype(np.float32)), layout.kv_dtype)
        v = kv_storage(torch.from_numpy(rng.standard_normal((n, g.dv)).astype(np.float32)), layout.kv_dtype)
        shared = [side for side in (g.k_shared, g.v_shared) if side]
        idx = [rng.integers(0, layout.pool_size, (n, 1)).astype(layout.dtype("idx")) for _ in shared]
        recs.append(encode_entry(layout, n, [k, v, *idx]))
    return recs


def random_lengths(n_users: int, rng: np.random.Generator) -> list[int | None]:
    """Lengths 0, 1, L and a cold-start user first, then random ones (some cold)."""
    rest = [None if rng.random() < 0.2 else int(rng.integers(0, SEQ + 1)) for _ in range(max(0, n_users - 4))]
    return ([0, 1, SEQ, None] + rest)[:n_users]


def setup(name: str, kv_dtype: str) -> tuple[ResidentModel, EntryLayout]:
    overrides, mode = MODELS[name]
    model = make_model(small_config(**overrides), seed=1).eval()
    return ResidentModel(model, "cpu"), layout_for(model, VERSION, mode, kv_dtype)


def eager_logits(resident: ResidentModel, host, cand: torch.Tensor, path: str) -> torch.Tensor:
    """The regular runtime path: to_device + unpack (L = longest history) + decode."""
    dev, _ = to_device(host, resident.device)
    return decode(resident, din_cache(dev.unpack()), cand, path)


@given(name=st.sampled_from(sorted(MODELS)), kv_dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       n_users=st.integers(1, 9), n_cand=st.integers(1, 3), extra_len=st.integers(0, 3),
       path=st.sampled_from(["auto", "poolscore", "gather"]), seed=st.integers(0, 999))
@settings(max_examples=40, deadline=None)
def test_static_decode_equals_unpack_and_decode(name: str, kv_dtype: str, n_users: int, n_cand: int, extra_len: int,
                                                path: str, seed: int) -> None:
    """static_decode on a buffer whose bytes past the batch are garbage == decode(unpack()) of the batch."""
    rng = np.random.default_rng(seed)
    resident, layout = setup(name, kv_dtype)
    host = HostBatcher(layout, pin=False).pack(np.arange(n_users), random_records(layout, random_lengths(n_users, rng),
                                                                                 rng))
    pad_to = SEQ + extra_len
    capacity = batch_capacity(layout, n_users, pad_to)
    assert host.used_bytes <= capacity
    raw = torch.from_numpy(rng.integers(0, 256, capacity, dtype=np.uint8))  # stale bytes everywhere
    raw[: host.used_bytes] = host.tensor
    cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (n_users, n_cand)))
    with torch.inference_mode():
        got = static_decode(raw, cand, resident=resident, layout=layout, n_users=n_users, pad_to=pad_to, path=path)
        want = eager_logits(resident, host, cand, path)
    assert got.shape == (n_users, n_cand) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("path", ["poolscore", "gather"])
def test_static_decode_is_shape_static(name: str, kv_dtype: str, path: str) -> None:
    """The captured body runs on the meta device (no data): so it has no .item() / int(tensor) /
    bool(tensor), boolean masking, nonzero or other data-dependent shape — what graph capture forbids."""
    overrides, mode = MODELS[name]
    model = make_model(small_config(**overrides), seed=1).eval()
    resident = ResidentModel(model, "meta")
    layout = layout_for(model, VERSION, mode, kv_dtype)
    raw = torch.empty(batch_capacity(layout, 5, SEQ + 2), dtype=torch.uint8, device="meta")
    cand = torch.empty(5, 3, dtype=torch.int64, device="meta")
    with torch.inference_mode():
        flags = torch.zeros(5, dtype=torch.int32, device="meta")  # as GraphedDecoder passes its static flags
        out = static_decode(raw, cand, resident=resident, layout=layout, n_users=5, pad_to=SEQ + 2, path=path,
                            flags=flags)
    assert out.device.type == "meta" and out.shape == (5, 3) and out.dtype == torch.float32
    with pytest.raises((RuntimeError, NotImplementedError)):  # what a host sync does on meta
        raw.sum().item()


def successive_batches(layout: EntryLayout, n_users: int, rng: np.random.Generator) -> list[tuple[list, np.ndarray]]:
    """Batches of different users: a long one, then one whose records are all shorter (stale bytes remain
    past its used_bytes), then random ones."""
    long = [SEQ] * (n_users - 1) + [None]
    short = [None, 0] + [1] * (n_users - 2)
    out = [long, short, random_lengths(n_users, rng), random_lengths(n_users, rng)]
    return [(lengths, rng.permutation(1000)[:n_users]) for lengths in out]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("path", ["poolscore", "gather"])
def test_static_buffers_reused_across_batches(name: str, path: str) -> None:
    """GraphedDecoder (eager on CPU) over successive batches == the regular path for each one."""
    rng = np.random.default_rng(5)
    resident, layout = setup(name, "float16")
    n_users, n_cand = 6, 2
    graph = GraphedDecoder(resident, layout, n_users=n_users, pad_to=SEQ, n_candidates=n_cand, path=path, eager=True)
    assert graph.path == path and graph.capacity == batch_capacity(layout, n_users, SEQ)
    batcher = HostBatcher(layout, pin=False, n_buffers=2)
    used = []
    for lengths, ids in successive_batches(layout, n_users, rng):
        host = batcher.pack(ids, random_records(layout, lengths, rng))
        cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (n_users, n_cand)))
        with torch.inference_mode():
            got = graph.run(host, cand).clone()
            want = eager_logits(resident, host, cand, path)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        used.append(host.used_bytes)
    assert used[1] < used[0]  # the short batch left stale bytes of the long one in the static buffer


def test_graphed_decoder_refuses_what_does_not_fit() -> None:
    resident, layout = setup("collective", "float16")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        GraphedDecoder(resident, layout, n_users=2, pad_to=SEQ)
    with pytest.raises(ValueError, match="path must be"):
        GraphedDecoder(resident, layout, n_users=2, pad_to=SEQ, path="fast", eager=True)
    graph = GraphedDecoder(resident, layout, n_users=3, pad_to=4, eager=True, capacity=1)
    assert graph.path in ("poolscore", "gather") and graph.capacity >= 16 * 3 + 8
    assert torch.isfinite(graph.replay()).all()  # all cold before the first load
    rng = np.random.default_rng(0)
    batcher = HostBatcher(layout, pin=False)
    with pytest.raises(ValueError, match="exactly 3"):
        graph.check(batcher.pack([1, 2], random_records(layout, [1, 2], rng)))
    with pytest.raises(ValueError, match="pad_to 4 < longest history"):
        graph.check(batcher.pack([1, 2, 3], random_records(layout, [1, 5, None], rng)))
    with pytest.raises(ValueError, match="bytes"):
        graph.check(batcher.pack([1, 2, 3], random_records(layout, [4, 4, 4], rng)))
    other = layout_for(make_model(small_config(), seed=1), "fedcba9876543210")
    with pytest.raises(ValueError, match="another store layout"):
        graph.check(HostBatcher(other, pin=False).pack([1, 2, 3], [None, None, None]))


@given(capacity=st.integers(8, 64 << 20), used=st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_copy_buckets_bound_the_extra_bytes(capacity: int, used: float) -> None:
    """The captured copies: sizes ascending and 8-aligned, the largest is the (8-aligned) capacity, and
    any batch of u <= capacity bytes copies at most √2·max(64 KiB, u) + 8 bytes."""
    buckets = copy_buckets(capacity)
    assert buckets == sorted(set(buckets)) and all(b % 8 == 0 for b in buckets)
    assert buckets[-1] == (capacity + 7) & ~7 and len(buckets) <= 2 + 2 * max(0, (capacity >> 16).bit_length())
    u = int(used * capacity)
    chosen = buckets[bisect.bisect_left(buckets, u)]
    assert u <= chosen <= math.sqrt(2) * max(64 << 10, u) + 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A collective fp16 store of users 100..111 (lengths 0, 1, L among them)."""
    model = make_model(small_config(kv_mode="collective"), seed=1).eval()
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, SEQ + 1, (12,), generator=g)
    lengths[:3] = torch.tensor([0, 1, SEQ])
    items = torch.randint(1, N_ITEMS + 1, (12, SEQ), generator=g)
    feedback = torch.randint(1, 3, (12, SEQ), generator=g)
    pad = torch.arange(SEQ).unsqueeze(0) >= lengths.unsqueeze(1)
    items[pad], feedback[pad] = 0, 0
    root = tmp_path_factory.mktemp("graphs-store")
    store_of_model(root, model, VERSION, list(range(100, 112)), items, feedback, lengths, "collective", "float16")
    return {"model": model, "reader": StoreReader(open_current(root))}


def test_fetch_pads_with_cold_slots(store: dict) -> None:
    batcher = HostBatcher(store["reader"].layout, reader=store["reader"], pin=False)
    host = batcher.fetch([101, 5, 102], n_slots=6)
    assert host.n_users == 6 and host.user_ids.tolist() == [101, 5, 102, -1, -1, -1]
    assert host.present.tolist() == [True, False, True, False, False, False] and host.cold_start == 4
    assert host.lengths[3:].tolist() == [0, 0, 0] and (host.offsets[3:] == host.zero_offset).all()
    assert bytes(host.record(2)) == store["reader"].get_raw(102)
    with pytest.raises(ValueError, match="n_slots"):
        batcher.fetch([1, 2, 3], n_slots=2)


def request(seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [105, 100, 101, 7, 111, 100, 99999, 102, 103]  # cold (7, 99999) and repeated users
    return ids, rng.integers(1, N_ITEMS + 1, (len(ids), 3)), rng.integers(1, 4, len(ids))


def test_runtime_graphs_option(store: dict) -> None:
    """graphs=True is refused off CUDA; its static-shape path (run eagerly on CPU) scores like the runtime."""
    model, reader = store["model"], store["reader"]
    with pytest.raises(ValueError, match="graphs=True needs a CUDA device"):
        DecodeRuntime(model, VERSION, reader, device="cpu", graphs=True)
    ids, cand, n_cand = request(0)
    for path, max_pairs in (("poolscore", 8192), ("gather", 8192), ("auto", 5)):
        kw = dict(device="cpu", path=path, batch_users=4, max_pairs=max_pairs)
        want = DecodeRuntime(model, VERSION, reader, **kw).score(ids, cand, n_cand)
        rt = DecodeRuntime(model, VERSION, reader, **kw)
        rt.graphs = True  # CPU: the same static buffers and padding, decoded without a graph
        for _ in range(2):  # the second call reuses the cached static decoders
            got = rt.score(ids, cand, n_cand)
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)  # NaN where padding
            assert got.cold_start.tolist() == want.cold_start.tolist()
        assert rt.stats.cold_start_users == 2 * 2 and rt.stats.users == 2 * len(ids)
        assert all(k[0] == min(4, max(1, max_pairs // k[1])) for k in rt._graphs)
        assert all(g.pad_to == SEQ for g in rt._graphs.values())
        rt.batcher = MappedBatcher(reader.layout, reader=reader, expected_model_version=VERSION, pin=False)
        zero_copy = rt.score(ids, cand, n_cand)  # zero-copy fetch: gathered from the map, scored alike
        np.testing.assert_allclose(zero_copy.logits, want.logits, rtol=1e-5, atol=1e-5)
        assert zero_copy.cold_start.tolist() == want.cold_start.tolist()
    with pytest.raises(ValueError, match="zero_copy=True needs graphs=True"):
        DecodeRuntime(model, VERSION, reader, device="cpu", zero_copy=True)


# --------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("path", ["poolscore", "gather"])
def test_graph_replay_equals_eager_on_cuda(name: str, path: str) -> None:
    """Replays over successive batches (different users; a batch of shorter records after a long one,
    so stale bytes stay past used_bytes; the copy captured in the graph, sized by bucket) == eager
    unpack + decode of each batch on the GPU; one graph per (host buffer, copy bucket)."""
    rng = np.random.default_rng(11)
    overrides, mode = MODELS[name]
    model = make_model(small_config(**overrides), seed=1).eval()
    resident = ResidentModel(model, "cuda")
    layout = layout_for(model, VERSION, mode, "float16")
    n_users, n_cand = 6, 2
    with torch.inference_mode():
        graph = GraphedDecoder(resident, layout, n_users=n_users, pad_to=SEQ, n_candidates=n_cand, path=path)
    batcher = HostBatcher(layout, pin=True, n_buffers=2)
    for lengths, ids in successive_batches(layout, n_users, rng):
        host = batcher.pack(ids, random_records(layout, lengths, rng))
        cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (n_users, n_cand))).cuda()
        with torch.inference_mode():
            got = graph.run(host, cand).clone()
            want = eager_logits(resident, host, cand, path)
        cost = graph.last_cost
        assert cost is not None and cost.bytes == graph.copy_bytes(host) >= host.used_bytes and cost.ms > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    same = graph.replay().clone()  # replay without a new batch: same inputs, same logits
    torch.testing.assert_close(graph.replay(), same, rtol=1e-6, atol=1e-6)
    assert 2 <= graph.n_graphs <= 2 * len(graph.buckets)  # both ring buffers were used


@pytest.mark.cuda
@cuda
def test_cuda_runtime_graphs_match_eager(store: dict) -> None:
    model, reader = store["model"], store["reader"]
    ids, cand, n_cand = request(1)
    cpu = DecodeRuntime(model, VERSION, reader, device="cpu").score(ids, cand, n_cand).logits
    for path in ("poolscore", "gather"):
        rt = DecodeRuntime(make_model(model.cfg, seed=1).eval(), VERSION, reader, device="cuda", path=path,
                           batch_users=4, graphs=True)
        for _ in range(3):
            res = rt.score(ids, cand, n_cand)
            np.testing.assert_allclose(res.logits, cpu, rtol=1e-4, atol=1e-4)
        assert rt._graphs and all(g.n_graphs >= 1 for g in rt._graphs.values())
        assert rt.stats.cold_start_users == 3 * 2 and (rt.stats.h2d_ms > 0) == (rt.tier is None)
    rt = DecodeRuntime(make_model(model.cfg, seed=1).eval(), VERSION, reader, device="cuda", batch_users=4,
                       graphs=True, zero_copy=True)
    for _ in range(3):  # records gathered from the registered LMDB map inside the graph
        res = rt.score(ids, cand, n_cand)
        np.testing.assert_allclose(res.logits, cpu, rtol=1e-4, atol=1e-4)
    assert isinstance(rt.batcher, MappedBatcher) and rt.stats.h2d_bytes > 0
    rt.batcher.close()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [1, 7, 1024, 1500])
def test_read_pinned_copies_host_memory_by_a_kernel(n: int) -> None:
    """read_pinned: the device tensor holds the pinned host tensor's values, eagerly and replayed in a graph after
    the host values changed (the kernel reads the host memory at replay time)."""
    src = torch.arange(n, dtype=torch.int64).pin_memory()
    dst = torch.full((n,), -1, dtype=torch.int64, device="cuda")
    read_pinned(dst, src)
    assert torch.equal(dst.cpu(), src)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        read_pinned(dst, src)
    src.mul_(3)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)


def test_read_pinned_off_cuda_is_a_copy() -> None:
    src, dst = torch.arange(5), torch.zeros(5, dtype=torch.int64)
    read_pinned(dst, src)
    assert torch.equal(dst, src)
