"""The fused HSTU decode (cachestore/decode/fused_hstu.py) against the model's training forward and the eager path.

Records come from the HSTU model's own prefill (tests/zoo_store_fixtures.py rows, encoded as the store
holds them) packed by ``HostBatcher.pack``; on a CUDA machine the kernel runs compiled, on CPU under
Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), and the tests skip where
Triton is not installed. Histories: lengths 0, 1, inside the window, the window, longer than it
(windowed by the prefill) and a cold-start user. References: ``model.decode(model.prefill(...))`` (the
training forward's decode) on the cache the store holds (fp16-rounded user parts for an fp16 store, K/V
rebuilt at d_a for a full-KV store) and the eager serving path (unpack → ``entry_cache`` → ``decode_zoo``)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode import copy_plan
from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.copy_plan import record_ends
from collectivekv.cachestore.decode.decode import ResidentZooModel, decode_zoo, entry_cache
from collectivekv.cachestore.decode.fused import FusedConfig, fused_available
from collectivekv.cachestore.decode.fused_hstu import hstu_static_decode, layer_tables, part_offsets
from collectivekv.cachestore.decode.fused_norm import norm_gate
from collectivekv.cachestore.decode.graphs import GraphedDecoder
from collectivekv.cachestore.decode.transfer import to_device
from collectivekv.cachestore.store.entry import entry_from_parquet_row, entry_layout
from collectivekv.cachestore.store.record import RouterIndexError
from collectivekv.model.cache_spec import store_config
from collectivekv.model.entry import full_cache
from tests.cachestore.decode.zoo_serving_helpers import rounded
from tests.model.zoo_helpers import N_ITEMS, VARIANTS, make_batch, make_model, zoo_config
from tests.zoo_store_fixtures import zoo_prefill_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VERSION = "0123456789abcdef"
# one block, one head group, one part: the fewest interpreted programs (block and split variants below)
EXACT = FusedConfig(pool_dtype="float32", block_l=16, heads_per_program=4, split_l=1)
TOL = {"float32": (1e-5, 1e-5), "float16": (2e-2, 2e-2)}  # (rtol, atol) against the unrounded forward


@dataclasses.dataclass
class Case:
    model: torch.nn.Module
    resident: ResidentZooModel
    layout: object
    host: object
    raw: torch.Tensor  # the packed batch on DEVICE, garbage past it
    hist: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # items, feedback, lengths (cold user: length 0)
    records: list  # the users' records (None: cold)


def make_case(variant: str, layers: int, mode: str, kv_dtype: str, seed: int = 0, idx_dtype: str | None = None
              ) -> Case:
    """Six users: lengths 0, 1, 4, the window, longer than it, and a cold start (no record); ``idx_dtype``
    overrides the store's router-index width."""
    cfg = zoo_config("hstu", hstu_layers=layers, **VARIANTS[variant])
    model = make_model(cfg, seed=seed).eval()
    w = cfg.max_len
    items, feedback, lengths, _ = make_batch([0, 1, 4, w, w + 3, 0], w + 3, seed)
    layout = entry_layout(cfg, VERSION, mode, kv_dtype)
    if idx_dtype is not None:
        layout = dataclasses.replace(layout, idx_dtype=idx_dtype)
    ids = list(range(6))
    rows = zoo_prefill_rows(model, layout, ids[:5], items[:5], feedback[:5], lengths[:5])
    records = [entry_from_parquet_row(layout, **row) for row in rows] + [None]
    host = HostBatcher(layout, pin=False).pack(ids, records)
    garbage = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, host.used_bytes + 64, dtype=np.uint8))
    garbage[: host.used_bytes] = host.tensor
    resident = ResidentZooModel(copy.deepcopy(model), DEVICE)  # the training model stays on the CPU
    return Case(model, resident, layout, host, garbage.to(DEVICE), (items, feedback, lengths), records)


def reference(case: Case, cand: torch.Tensor, stored: bool) -> torch.Tensor:
    """``model.decode(model.prefill(history))``; ``stored``: on the cache as the store holds it."""
    with torch.no_grad():
        cache = case.model.prefill(*case.hist)
        if stored and case.layout.mode == "full":
            cache = full_cache(case.model, cache)
        if stored and case.layout.kv_dtype == "float16":
            cache = rounded(cache)
        return case.model.decode(cache, cand.cpu())


def eager(case: Case, cand: torch.Tensor) -> torch.Tensor:
    """The eager serving path: unpack every part, the model's ZooCache, its own decode."""
    with torch.inference_mode():
        dev, _ = to_device(case.host, DEVICE)
        cfg = store_config(case.resident.cfg, case.layout.mode)
        return decode_zoo(case.resident, entry_cache(dev.unpack(), cfg, case.resident.dtype), cand)


def fused(case: Case, cand: torch.Tensor, config: FusedConfig = EXACT, flags: torch.Tensor | None = None,
          **chunked):
    with torch.inference_mode():
        return hstu_static_decode(case.raw, cand, resident=case.resident, layout=case.layout, n_users=6,
                                  config=config, flags=flags, **chunked)


CHUNK_CASE = make_case("collective", 2, "collective", "float16", seed=6)
CHUNK_CAND = torch.randint(1, N_ITEMS + 1, (6, 2), generator=torch.Generator().manual_seed(6)).to(DEVICE)
STORES = [  # (variant, layers, store mode, kv dtype)
    ("collective", 2, "collective", "float32"),
    ("collective", 1, "collective", "float16"),
    ("collective", 2, "full", "float32"),
    ("collective", 1, "full", "float16"),
    ("share_k", 2, "collective", "float32"),  # fp32 user parts after an odd index part: read as 16-bit halves
    ("share_v", 1, "collective", "float16"),
    ("full", 1, "full", "float32"),  # a full-KV model
]


@pytest.mark.parametrize("n_cand", [1, 3])
@pytest.mark.parametrize(("variant", "layers", "mode", "kv_dtype"), STORES)
def test_fused_hstu_equals_forward_and_eager(variant: str, layers: int, mode: str, kv_dtype: str,
                                             n_cand: int) -> None:
    """Logits from the packed bytes (pool rows exact) == the training forward's decode on the stored cache
    and == the eager serving path (fp32 summation order); within the fp16 rounding of the user parts of the
    plain forward; every flag clear."""
    case = make_case(variant, layers, mode, kv_dtype, seed=layers)
    cand = torch.randint(1, N_ITEMS + 1, (6, n_cand), generator=torch.Generator().manual_seed(n_cand)).to(DEVICE)
    flags = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    got = fused(case, cand, flags=flags)
    assert got.shape == (6, n_cand) and torch.isfinite(got).all() and not flags.any()
    torch.testing.assert_close(got.cpu(), reference(case, cand, stored=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, eager(case, cand), rtol=1e-5, atol=1e-5)
    rtol, atol = TOL[kv_dtype]
    torch.testing.assert_close(got.cpu(), reference(case, cand, stored=False), rtol=rtol, atol=atol)


@pytest.mark.parametrize("config", [
    FusedConfig(pool_dtype="float32", block_l=4, heads_per_program=2, split_l=4),  # several blocks and parts
    FusedConfig(pool_dtype="float32", block_l=8, heads_per_program=1, split_l=2),
])  # fmt: skip
def test_blocks_head_groups_and_parts_give_the_same_logits(config: FusedConfig) -> None:
    case = make_case("collective", 2, "collective", "float32", seed=5)
    cand = torch.randint(1, N_ITEMS + 1, (6, 2), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.testing.assert_close(fused(case, cand, config), fused(case, cand), rtol=1e-5, atol=1e-5)


@given(cuts=st.lists(st.integers(0, 4096), max_size=3), split_l=st.sampled_from([1, 2]))
@settings(max_examples=6, deadline=None)
def test_first_layer_launches_per_copy_chunk_serve_each_user_once(cuts: list[int], split_l: int) -> None:
    """The first layer's history launched once per byte chunk (an overlapped graph's decode), each launch serving
    the users whose records end in it, scores exactly as one launch: every user once, wherever the cuts fall
    (inside a record, on its end, past the batch); lengths 0, 1, the window and a cold user; split histories."""
    case = CHUNK_CASE
    header = 16 * 6
    edges = sorted({0, case.raw.numel(), *(header + c for c in cuts if header + c < case.raw.numel())})
    pieces = list(zip(edges[:-1], edges[1:], strict=True))
    config = dataclasses.replace(EXACT, split_l=split_l)
    launched: list[int] = []
    want = fused(case, CHUNK_CAND, config)
    got = fused(case, CHUNK_CAND, config, chunks=record_ends(pieces), on_chunk=launched.append)
    assert launched == list(range(len(pieces) + 1))  # one call per launch, then the join
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("n_parts", [1, 3])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_norm_gate_is_the_layers_norm_of_the_summed_parts_times_u(n_parts: int, affine: str) -> None:
    """norm_gate(parts, norm, u) == norm(parts.sum(0)) * u, u a column range of a wider tensor (read in place)."""
    g = torch.Generator().manual_seed(n_parts)
    parts = torch.randn(n_parts, 3, 2, 24, generator=g) * 5
    wide = torch.randn(3, 2, 70, generator=g)
    u = wide[..., 24:48]  # (3, 2, 24) with row stride 70
    norm = torch.nn.LayerNorm(24, elementwise_affine=affine != "none", bias=affine == "both")
    with torch.no_grad():
        for t in norm.parameters():
            t.copy_(torch.randn(t.shape, generator=g))
        want = norm(parts.sum(0)) * u
        got = norm_gate(parts.to(DEVICE), norm.to(DEVICE), u.to(DEVICE))
    assert got.shape == (3, 2, 24)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_chunks_must_partition_the_batch() -> None:
    for chunks in ([], [(0, 1 << 62)], [(-1, 40), (50, 1 << 62)], [(-1, 10)]):
        with pytest.raises(ValueError, match="chunks must be contiguous"):
            fused(CHUNK_CASE, CHUNK_CAND, chunks=chunks)


@pytest.mark.parametrize(("kv_dtype", "idx_dtype"), [("bfloat16", None), ("float32", "int32"), ("float16", "int32")])
def test_other_store_dtypes_equal_eager(kv_dtype: str, idx_dtype: str | None) -> None:
    """bfloat16 user parts and int32 router indices (read as 16-bit halves) score like the eager serving path."""
    case = make_case("collective", 2, "collective", kv_dtype, seed=4, idx_dtype=idx_dtype)
    assert idx_dtype is None or case.layout.itemsize("idx") == 4
    cand = torch.randint(1, N_ITEMS + 1, (6, 2), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    torch.testing.assert_close(fused(case, cand), eager(case, cand), rtol=1e-5, atol=1e-5)


def test_store_precision_pools_by_default() -> None:
    """The default launch reads fp16 pool rows for an fp16 store: the tables are built at fp16, and the
    logits stay within fp16 rounding of the forward."""
    case = make_case("collective", 2, "collective", "float16", seed=7)
    cand = torch.randint(1, N_ITEMS + 1, (6, 2), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = fused(case, cand, dataclasses.replace(EXACT, pool_dtype="store"))
    assert torch.float16 in case.resident.__dict__["_fused_hstu_tables"]
    pool_k, pool_v, bias = layer_tables(case.resident, torch.float16)[1]
    assert pool_k.shape == (12, 32) and pool_k.dtype == torch.float16 and (pool_k[:, :2] == 0).all()
    assert bias.shape == (4, case.resident.cfg.max_len + 1) and bias.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), reference(case, cand, stored=False), rtol=2e-2, atol=2e-2)


def start(case: Case, part: str, b: int) -> int:
    """Byte start of ``part`` of user b's record in the packed batch (:func:`part_offsets`)."""
    n = min(int(case.host.lengths[b]), case.layout.max_len)
    return int(case.host.offsets[b]) + 32 + n * part_offsets(case.layout)[0][part]


def test_part_offsets_point_at_each_part() -> None:
    """offsets[b] + 32 + n · part_offsets[p] = each part's byte start, and n · (bytes of a behaviour) its end."""
    case = make_case("collective", 2, "collective", "float16")
    host = case.host
    for b in range(5):
        at = int(host.offsets[b]) + 32
        n = int(host.lengths[b])
        for p, size in zip(case.layout.parts, case.layout.part_sizes(n), strict=True):
            assert start(case, p.name, b) == at
            at += size
        assert at == int(host.offsets[b]) + 32 + n * part_offsets(case.layout)[1]


def test_corrupt_router_index_sets_flags() -> None:
    """A stored router index outside the pool: the user's flag is set (its pool rows never read), other users'
    logits unchanged; without flags a RouterIndexError names the batch row."""
    case = make_case("collective", 2, "collective", "float16", seed=2)
    cand = torch.randint(1, N_ITEMS + 1, (6, 2), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    clean = fused(case, cand)
    at = start(case, "layer1.v_idx", 3) + 2  # user 3's second behaviour
    case.raw[at : at + 2] = torch.tensor([0xFF, 0xFF], dtype=torch.uint8)  # uint16 65535 >= pool_size
    flags = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    got = fused(case, cand, flags=flags)
    assert flags.tolist() == [0, 0, 0, 1, 0, 0] and torch.isfinite(got).all()
    keep = [0, 1, 2, 4, 5]
    torch.testing.assert_close(got[keep], clean[keep], rtol=0, atol=0)
    with pytest.raises(RouterIndexError, match="batch row 3"):
        fused(case, cand)


def test_refuses_what_it_cannot_serve() -> None:
    case = make_case("collective", 1, "collective", "float16")
    cand = torch.ones(7, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="b <= 6 users"):
        fused(case, cand)
    other = entry_layout(zoo_config("hstu", hstu_layers=2), VERSION, "collective", "float16")
    with pytest.raises(ValueError, match="not those of the model"):
        hstu_static_decode(case.raw, cand[:6], resident=case.resident, layout=other, n_users=6)
    with pytest.raises(ValueError, match="model's device"):
        hstu_static_decode(case.raw.to(torch.int8), cand[:6], resident=case.resident, layout=case.layout, n_users=6)
    with pytest.raises(ValueError, match="heads_per_program"):
        fused(case, cand[:6], dataclasses.replace(EXACT, heads_per_program=8))


@cuda
@pytest.mark.cuda
def test_fused_hstu_graph_replay_on_cuda() -> None:
    """A CUDA graph of hstu_static_decode captured over an empty static buffer (every user length 0) scores the
    batch copied into that buffer afterwards: its replay == the eager serving path."""
    case = make_case("collective", 2, "collective", "float16", seed=3)
    cand = torch.randint(1, N_ITEMS + 1, (6, 2), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    config = FusedConfig(pool_dtype="float32")
    flags = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    raw = torch.zeros_like(case.raw)  # header of zeros: every user at the zero block with no behaviours
    with torch.inference_mode():
        layer_tables(case.resident, torch.float32)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile the kernel outside the capture
            hstu_static_decode(raw, cand, resident=case.resident, layout=case.layout, n_users=6, config=config,
                               flags=flags)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = hstu_static_decode(raw, cand, resident=case.resident, layout=case.layout, n_users=6,
                                     config=config, flags=flags)
        raw.copy_(case.raw)
        graph.replay()
        torch.testing.assert_close(out, eager(case, cand), rtol=1e-5, atol=1e-5)
        assert not flags.any()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("concurrent", [True, False])
def test_overlapped_graph_replays_to_the_one_piece_graph_on_cuda(concurrent: bool, monkeypatch) -> None:
    """A graph copying the batch in pieces, the first layer's history launched once per piece (waiting for that piece
    only), scores like the graph with one copy, over both ring buffers."""
    monkeypatch.setattr(copy_plan, "_MIN_CHUNK", 256)  # the small test batch still splits into pieces
    case = make_case("collective", 2, "collective", "float16", seed=8)
    batcher = HostBatcher(case.layout, pin=True)
    config = FusedConfig(pool_dtype="float32", split_l=2)
    graphs = [GraphedDecoder(case.resident, case.layout, n_users=6, pad_to=case.layout.max_len, n_candidates=2,
                             path="fused", overlap=k, concurrent=concurrent, fused=config) for k in (1, 3)]
    for seed in range(3):
        host = batcher.pack(list(range(6)), case.records)
        assert len(graphs[1].pieces(graphs[1].copy_bytes(host))) > 1
        cand = torch.randint(1, N_ITEMS + 1, (6, 2), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            want, got = (g.run(host, cand).clone() for g in graphs)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, eager(case, cand.to(DEVICE)), rtol=1e-5, atol=1e-5)
