"""Fused collective target attention (cachestore/decode/fused.py) against the eager unpack + decode.

On a CUDA machine the Triton kernel runs compiled; on CPU it runs under Triton's interpreter
(conftest sets TRITON_INTERPRET=1 when there is no GPU) wherever Triton is installed, and the
tests skip where it is not. The reference is the plain gather path (concat(user part, pool rows),
then ``model.attention.target_attention``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode import copy_plan
from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.fused import FusedConfig, fused_attention, fused_available, fused_decode
from collectivekv.cachestore.decode.fused_config import split_parts
from collectivekv.cachestore.decode.graphs import (
    GraphedDecoder,
    batch_capacity,
    copy_chunks,
    record_ends,
    static_decode,
)
from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.jobs.score import score as score_cmd
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.cachestore.decode.test_graphs import (
    MODELS,
    SEQ,
    VERSION,
    eager_logits,
    random_lengths,
    random_records,
    request,
    setup,
)
from tests.cachestore.decode.test_graphs import store as store  # noqa: F401  (the module-scoped LMDB store fixture)
from tests.model.test_model import N_ITEMS, make_model, small_config
from tests.store_fixtures import store_of_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EXACT = FusedConfig(pool_dtype="float32")  # the model's pool rows exactly, whatever the store's precision


def batch(name: str, kv_dtype: str, idx_dtype: str, n_users: int, seed: int, extra: int = 0):
    """(resident on DEVICE, layout, host batch, device raw buffer with garbage past the batch)."""
    rng = np.random.default_rng(seed)
    resident, layout = setup(name, kv_dtype)
    if layout.idx_dtype is not None:
        layout = dataclasses.replace(layout, idx_dtype=idx_dtype)
    resident = type(resident)(resident.model, DEVICE)
    host = HostBatcher(layout, pin=False).pack(np.arange(n_users), random_records(layout, random_lengths(n_users, rng),
                                                                                 rng))
    raw = torch.from_numpy(rng.integers(0, 256, host.used_bytes + extra, dtype=np.uint8))
    raw[: host.used_bytes] = host.tensor
    return resident, layout, host, raw.to(DEVICE), rng


@given(name=st.sampled_from(sorted(MODELS)), kv_dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       idx_dtype=st.sampled_from(["uint16", "int32"]), n_users=st.integers(1, 7), n_cand=st.integers(1, 3),
       seed=st.integers(0, 999), split_l=st.sampled_from([None, 1, 2, 8]))
@settings(max_examples=25, deadline=None)
def test_fused_decode_equals_eager(name: str, kv_dtype: str, idx_dtype: str, n_users: int, n_cand: int,
                                   seed: int, split_l: int | None) -> None:
    """Logits from the packed bytes == unpack + gather decode, for every store shape the runtime serves:
    K+V shared, K only, V only, user dims spanning heads, full-KV store; lengths 0, 1, L, cold users;
    int32 indices (read as 16-bit halves: no alignment assumption); garbage past the batch; histories
    split into parts (some empty) and combined."""
    resident, layout, host, raw, rng = batch(name, kv_dtype, idx_dtype, n_users, seed, extra=64)
    cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (n_users, n_cand))).to(DEVICE)
    with torch.inference_mode():
        config = dataclasses.replace(EXACT, block_l=2, split_l=split_l)
        got = fused_decode(resident, raw, layout, n_users, cand, config=config)
        want = eager_logits(resident, host, cand, "gather")
    assert got.shape == (n_users, n_cand) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_attention_of_empty_history_is_zero() -> None:
    """A user with no behaviours (length 0 or cold start) attends to nothing: exactly zero, no NaN."""
    resident, layout, host, raw, rng = batch("collective", "float16", "uint16", 4, seed=3)
    q = torch.randn(4, 2, resident.cfg.d_attn, device=DEVICE)
    with torch.inference_mode():
        out = fused_attention(raw, q, resident, layout, 4)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[3] == 0).all()  # random_lengths: user 0 has length 0, user 3 is cold
    assert (out[1] != 0).any()  # user 1 has one behaviour


def test_fused_refuses_what_it_cannot_read() -> None:
    resident, layout, host, raw, _ = batch("collective", "float16", "uint16", 2, seed=0)
    q = torch.randn(3, 1, resident.cfg.d_attn, device=DEVICE)
    with pytest.raises(ValueError, match="does not match a batch of 2 users"):
        fused_attention(raw, q, resident, layout, 2)
    with pytest.raises(ValueError, match="target rows"):
        fused_decode(resident, raw, layout, 2, torch.zeros(3, 1, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_static_decode_fused_path(name: str) -> None:
    """The graphs' static body with path "fused" (reads the static buffer as is) == eager decode."""
    resident, layout, host, _, rng = batch(name, "float16", "uint16", 5, seed=11)
    capacity = batch_capacity(layout, 5, SEQ)
    raw = torch.from_numpy(rng.integers(0, 256, capacity, dtype=np.uint8))
    raw[: host.used_bytes] = host.tensor
    cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (5, 2))).to(DEVICE)
    with torch.inference_mode():
        got = static_decode(raw.to(DEVICE), cand, resident=resident, layout=layout, n_users=5, pad_to=SEQ,
                            path="fused", fused=EXACT)
        want = eager_logits(resident, host, cand, "gather")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        half = FusedConfig(pool_dtype="float16", split_l=2)  # the decoder passes its launch settings on
        dec = GraphedDecoder(resident, layout, n_users=5, pad_to=SEQ, n_candidates=2, path="fused", eager=True,
                             fused=half)
        want = fused_decode(resident, raw.to(DEVICE), layout, 5, cand, config=half)
        torch.testing.assert_close(dec.run(host, cand), want, rtol=1e-6, atol=1e-6)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_graph_replay_on_cuda(name: str) -> None:
    """A captured graph of the fused decode (copies + q + kernel + MLP) replays to the eager scores; with
    fp16 pools, to the eager fused decode at the same settings; a pageable batch is refused."""
    resident, layout, pageable, raw, rng = batch(name, "float16", "uint16", 6, seed=5)
    host = HostBatcher(layout, pin=True).pack(pageable.user_ids, [pageable.record(b) for b in range(6)])
    cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (6, 2))).to(DEVICE)
    half = FusedConfig(pool_dtype="float16")
    with torch.inference_mode():
        graph = GraphedDecoder(resident, layout, n_users=6, pad_to=SEQ, n_candidates=2, path="fused", fused=EXACT)
        with pytest.raises(ValueError, match="pinned host memory"):  # a captured copy needs a pinned source
            graph.run(pageable, cand)
        got = graph.run(host, cand).clone()
        want = eager_logits(resident, host, cand, "gather")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        graph = GraphedDecoder(resident, layout, n_users=6, pad_to=SEQ, n_candidates=2, path="fused", fused=half)
        want = fused_decode(resident, raw, layout, 6, cand, config=half)
        torch.testing.assert_close(graph.run(host, cand).clone(), want, rtol=1e-5, atol=1e-5)


@given(n_users=st.integers(1, 7), seed=st.integers(0, 999), split_l=st.sampled_from([None, 1, 4]),
       cuts=st.lists(st.integers(0, 4096), max_size=4))
@settings(max_examples=15, deadline=None)
def test_fused_launches_per_copy_chunk_serve_each_user_once(n_users: int, seed: int, split_l: int | None,
                                                            cuts: list[int]) -> None:
    """One launch per byte chunk (the overlapped graph's decode), each serving the users whose records end
    in it, computes the one-launch attention: every user exactly once, wherever the cuts fall (inside a
    record, on its end, past the batch); lengths 0, 1, L and cold users; split histories combined once."""
    resident, layout, host, raw, rng = batch("collective", "float16", "uint16", n_users, seed, extra=16)
    q = torch.randn(n_users, 2, resident.cfg.d_attn, device=DEVICE)
    header = 16 * n_users
    edges = sorted({0, raw.numel(), *(header + c for c in cuts if header + c < raw.numel())})
    pieces = list(zip(edges[:-1], edges[1:], strict=True))
    config = FusedConfig(split_l=split_l)
    launched: list[int] = []
    with torch.inference_mode():
        want = fused_attention(raw, q, resident, layout, n_users, config=config)
        got = fused_attention(raw, q, resident, layout, n_users, config=config, chunks=record_ends(pieces),
                              on_chunk=launched.append)
    assert launched == list(range(len(pieces) + 1))  # one call per launch, then the join
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@given(nbytes=st.integers(1, 1 << 24), header=st.integers(16, 1 << 14), overlap=st.integers(1, 16))
def test_copy_chunks_cover_the_copy(nbytes: int, header: int, overlap: int) -> None:
    """Pieces tile [0, nbytes) in order, at most ``overlap`` of them, none under 256 KiB when split, cut at
    8-byte boundaries, the first holding the header; the kernel ranges partition (-1, 2^62]."""
    nbytes = max(nbytes, header)
    pieces = copy_chunks(nbytes, header, overlap)
    assert pieces[0][0] == 0 and pieces[-1][1] == nbytes and len(pieces) <= overlap
    assert all(a[1] == z[0] for a, z in zip(pieces, pieces[1:], strict=False))
    assert all(lo % 8 == 0 and lo < hi for lo, hi in pieces) and pieces[0][1] >= min(header, nbytes)
    assert len(pieces) == 1 or min(hi - lo for lo, hi in pieces) >= (256 << 10) // 2
    ends = record_ends(pieces)
    assert ends[0][0] < 0 and ends[-1][1] >= 1 << 62 and [e[1] for e in ends[:-1]] == [p[1] for p in pieces[:-1]]


def test_default_overlap_is_the_stores_dtype_entry_before_the_models() -> None:
    """A (model, kv dtype) entry of ``DTYPE_OVERLAP`` wins over the model's ``ARCH_OVERLAP``, which wins over the
    default; the other dtype of that model keeps the model's."""
    (arch, dtype), k = next(iter(copy_plan.DTYPE_OVERLAP.items()))
    other = "float16" if dtype == "float32" else "float32"
    assert copy_plan.default_overlap(arch, dtype) == k != copy_plan.default_overlap(arch, other)
    assert copy_plan.default_overlap(arch, other) == copy_plan.ARCH_OVERLAP[arch]
    assert copy_plan.default_overlap("din", dtype) == copy_plan.DEFAULT_OVERLAP


def test_fused_chunks_must_partition_the_batch() -> None:
    resident, layout, host, raw, rng = batch("collective", "float16", "uint16", 3, seed=2)
    q = torch.randn(3, 1, resident.cfg.d_attn, device=DEVICE)
    for chunks in ([], [(0, 1 << 62)], [(-1, 40), (50, 1 << 62)], [(-1, 10)]):
        with pytest.raises(ValueError, match="chunks must be contiguous"):
            fused_attention(raw, q, resident, layout, 3, chunks=chunks)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("overlap", [2, 4])
@pytest.mark.parametrize("concurrent", [True, False])
def test_overlapped_graph_replays_to_the_one_launch_graph_on_cuda(overlap: int, concurrent: bool,
                                                                  monkeypatch) -> None:
    """A graph copying the batch in pieces on a forked stream, each fused launch waiting for its piece only
    (on a stream of its own, or one after another on the graph's stream), scores like the graph with one
    copy, over successive batches of both ring buffers (split histories: parts written by launches that may
    run at once, combined after they join)."""
    monkeypatch.setattr(copy_plan, "_MIN_CHUNK", 256)  # small test batches still split into pieces
    resident, layout, pageable, raw, rng = batch("collective", "float16", "uint16", 6, seed=5)
    batcher = HostBatcher(layout, pin=True)
    plain = GraphedDecoder(resident, layout, n_users=6, pad_to=SEQ, n_candidates=2, path="fused", overlap=1)
    assert len(plain.pieces(1 << 20)) == 1
    split = GraphedDecoder(resident, layout, n_users=6, pad_to=SEQ, n_candidates=2, path="fused", overlap=overlap,
                           concurrent=concurrent, fused=FusedConfig(split_l=2))
    for seed in range(4):
        rng = np.random.default_rng(seed)
        host = batcher.pack(np.arange(6), random_records(layout, random_lengths(6, rng), rng))
        assert len(split.pieces(split.copy_bytes(host))) > 1
        cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (6, 2)))
        with torch.inference_mode():
            want = plain.run(host, cand).clone()
            got = split.run(host, cand).clone()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert split.last_cost is not None and split.last_cost.ms > 0


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("split_l", [1, 4])
def test_fused_reads_pinned_host_batch_on_cuda(split_l: int) -> None:
    """Mapped (zero-copy) read: the kernel over the pinned host batch == over its device copy; a pageable
    host batch is refused (the GPU cannot read it)."""
    resident, layout, host, raw, rng = batch("collective", "float16", "uint16", 7, seed=9)
    pinned = host.tensor.pin_memory()
    q = torch.randn(7, 2, resident.cfg.d_attn, device=DEVICE)
    config = FusedConfig(split_l=split_l)
    with torch.inference_mode():
        want = fused_attention(raw, q, resident, layout, 7, config=config)
        got = fused_attention(pinned, q, resident, layout, 7, config=config)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(ValueError, match="pinned host memory"):
            fused_attention(host.tensor.clone(), q, resident, layout, 7, config=config)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("heads_per_program", "num_stages", "split_l"), [(1, None, 1), (2, 1, 4), (4, 3, 2)])
@pytest.mark.parametrize("block_l", [2, 16])
def test_fused_tuning_knobs_keep_the_result(name: str, heads_per_program: int, num_stages: int | None,
                                            split_l: int, block_l: int) -> None:
    """Every launch setting (heads per program, pipelining stages, histories split into parts — some of
    them empty — and combined, BLOCK_L shorter and longer than L) computes the same attention."""
    resident, layout, host, raw, rng = batch(name, "float16", "uint16", 6, seed=21)
    q = torch.randn(6, 2, resident.cfg.d_attn, device=DEVICE)
    config = FusedConfig(block_l=block_l, heads_per_program=heads_per_program, num_stages=num_stages,
                         split_l=split_l)
    with torch.inference_mode():
        want = fused_attention(raw, q, resident, layout, 6)
        got = fused_attention(raw, q, resident, layout, 6, config=config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool_dtype", ["float16", "bfloat16"])
def test_fused_half_precision_pools_are_close(pool_dtype: str) -> None:
    """Rounding the pools (half the kernel's pool reads) changes the attention by the pool's rounding only."""
    resident, layout, host, raw, rng = batch("collective", "float16", "uint16", 6, seed=4)
    q = torch.randn(6, 1, resident.cfg.d_attn, device=DEVICE)
    with torch.inference_mode():
        want = fused_attention(raw, q, resident, layout, 6, config=EXACT)
        got = fused_attention(raw, q, resident, layout, 6, config=FusedConfig(pool_dtype=pool_dtype))
    tol = 2e-3 if pool_dtype == "float16" else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert not torch.equal(got, want)  # the rows really were rounded
    with pytest.raises(ValueError, match="power of two dividing"):
        fused_attention(raw, q, resident, layout, 6, config=FusedConfig(heads_per_program=16))


@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "bfloat16"])
def test_fused_reads_pool_rows_at_the_store_precision_by_default(kv_dtype: str) -> None:
    """FusedConfig() (pool_dtype "store") reads the pool rows at the store's kv dtype: the same attention as
    naming that dtype; an fp32 store's default is the exact model rows."""
    resident, layout, host, raw, rng = batch("collective", kv_dtype, "uint16", 5, seed=8)
    q = torch.randn(5, 2, resident.cfg.d_attn, device=DEVICE)
    with torch.inference_mode():
        default = fused_attention(raw, q, resident, layout, 5)
        named = fused_attention(raw, q, resident, layout, 5, config=FusedConfig(pool_dtype=kv_dtype))
        exact = fused_attention(raw, q, resident, layout, 5, config=EXACT)
    torch.testing.assert_close(default, named, rtol=0, atol=0)
    assert torch.equal(default, exact) == (kv_dtype == "float32")


def test_split_parts_fills_the_device_only_when_programs_are_few() -> None:
    """Auto split: parts double while programs stay within PROGRAMS_PER_SM (64) per SM (4 SMs assumed off
    CUDA) and each part keeps >= 2 blocks; an explicit split_l is taken as given."""
    cpu = torch.device("cpu")
    assert split_parts(FusedConfig(), rows=1, groups=4, max_len=1000, device=cpu) == 16  # 16 parts of 4 blocks
    assert split_parts(FusedConfig(block_l=32), rows=1, groups=4, max_len=1000, device=cpu) == 8
    assert split_parts(FusedConfig(), rows=8, groups=4, max_len=1000, device=cpu) == 8  # 256 programs on 4 SMs
    assert split_parts(FusedConfig(), rows=512, groups=4, max_len=1000, device=cpu) == 1
    assert split_parts(FusedConfig(), rows=1, groups=4, max_len=50, device=cpu) == 1  # one part of 2 blocks
    assert split_parts(FusedConfig(split_l=4), rows=512, groups=4, max_len=8, device=cpu) == 4


@pytest.mark.parametrize(("field", "value", "match"), [
    ("pool_dtype", "float8", "pool_dtype must be one of"), ("block_l", 24, "block_l must be a power of two"),
    ("num_warps", 0, "num_warps must be a power of two"), ("num_stages", 0, "num_stages must be >= 1"),
    ("split_l", 3, "split_l must be a power of two")])
def test_fused_config_refuses_bad_settings(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FusedConfig(**{field: value})


def test_runtime_fused_path_scores_like_gather(store: dict) -> None:
    """DecodeRuntime(path="fused") over a real LMDB store (cold and repeated users, 1-3 candidates per
    row) == the gather path; "auto" picks fused on CUDA only."""
    model, reader = store["model"], store["reader"]
    ids, cand, n_cand = request(3)
    want = DecodeRuntime(model, VERSION, reader, device=DEVICE, path="gather", batch_users=4).score(ids, cand, n_cand)
    rt = DecodeRuntime(model, VERSION, reader, device=DEVICE, path="fused", batch_users=4, fused_config=EXACT)
    got = rt.score(ids, cand, n_cand)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)  # NaN where padding
    assert got.cold_start.tolist() == want.cold_start.tolist() and rt.fused
    auto = DecodeRuntime(model, VERSION, reader, device=DEVICE, batch_users=4)
    assert auto.fused == (DEVICE == "cuda")


def test_ckv_score_fused_path_and_half_pools(tmp_path: Path) -> None:
    """`ckv score --path fused --pool-dtype float32` == `--path gather` on a real store; the default
    (`--pool-dtype store`: this fp16 store's precision) == `--pool-dtype float16`, within the pool
    rounding of the exact logits and actually different from them."""
    model = make_model(small_config(kv_mode="collective"), seed=2).eval()
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, SEQ + 1, (6,), generator=g)
    lengths[:2] = torch.tensor([0, SEQ])
    items = torch.randint(1, N_ITEMS + 1, (6, SEQ), generator=g)
    feedback = torch.randint(1, 3, (6, SEQ), generator=g)
    pad = torch.arange(SEQ).unsqueeze(0) >= lengths.unsqueeze(1)
    items[pad], feedback[pad] = 0, 0
    store_of_model(tmp_path / "store", model, version, list(range(10, 16)), items, feedback, lengths, "collective",
                   "float16")
    rng = np.random.default_rng(0)
    req = tmp_path / "requests.parquet"
    users, cand = rng.choice([*range(10, 16), 99], 30), rng.integers(1, N_ITEMS + 1, 30)  # 99: cold
    pq.write_table(pa.table({"user_id": users, "item_id": cand}), req)

    def logits(*options: str) -> np.ndarray:
        out = tmp_path / f"scores{len(options)}{'-'.join(options)}.parquet"
        args = ["--store", str(tmp_path / "store"), "--checkpoint", str(tmp_path / "ckpt"), "--requests", str(req),
                "--out", str(out), "--device", DEVICE, *options]
        result = CliRunner().invoke(score_cmd, args)
        assert result.exit_code == 0, result.output
        return pq.read_table(out).column("logit").to_numpy()

    want = logits("--path", "gather")
    np.testing.assert_allclose(logits("--path", "fused", "--pool-dtype", "float32"), want, rtol=1e-5, atol=1e-5)
    half = logits("--path", "fused", "--pool-dtype", "float16")
    np.testing.assert_array_equal(logits("--path", "fused"), half)
    np.testing.assert_allclose(half, want, rtol=3e-3, atol=3e-3)
    assert not np.array_equal(half, want)
