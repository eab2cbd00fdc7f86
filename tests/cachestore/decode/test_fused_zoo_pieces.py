"""The zoo's short and long stages launched once per copy piece (cachestore/decode/fused_zoo_long.py): each launch
serves the users whose records end in its byte range, and the logits are exactly those of one launch for every
user, wherever the cuts fall. On CPU under Triton's interpreter, compiled on CUDA; the overlapped CUDA graph (the
batch copied in pieces, each piece's launches waiting for it only) on CUDA."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode import copy_plan, fused_zoo
from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.copy_plan import record_ends
from collectivekv.cachestore.decode.fused import FusedConfig, attend_group, fused_available
from collectivekv.cachestore.decode.fused_long import bucket_sums, group_scores
from collectivekv.cachestore.decode.fused_zoo import check_store, entry_views, group_pools
from collectivekv.cachestore.decode.graphs import GraphedDecoder
from collectivekv.model.config import LONG_ARCHS
from tests.cachestore.decode.test_fused_zoo import DEVICE, EXACT, Case, fused_logits, packed
from tests.model.zoo_helpers import N_ITEMS

pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CASES = {(arch, mode): packed(arch, mode, "float32", seed=3) for arch in LONG_ARCHS for mode in ("collective", "full")}


def _record_ends(case: Case) -> list[int]:
    """One past each user's record in the batch (the cold slot's is its zero block's)."""
    views = entry_views(case.raw, case.layout, case.n_users, check_store(case.resident, case.layout))
    return sorted(set(views["long"].ends.cpu().tolist()))


def _pieces(case: Case, cuts: list[float], at_ends: bool) -> list[tuple[int, int]]:
    """Copy pieces cut after the header at fractions ``cuts`` of the records' bytes, or at every record's end."""
    header, size = 16 * case.n_users, case.raw.numel()
    inner = _record_ends(case) if at_ends else [header + int(f * (size - header)) for f in cuts]
    edges = sorted({0, size, *(c for c in inner if 0 < c < size)})
    return list(zip(edges[:-1], edges[1:], strict=True))


def _nan_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage buffer starts as NaN: a user no launch served would show (the allocator may hand back the
    blocks of an earlier decode, holding the right values)."""
    made = fused_zoo.stage_buffers

    def nan(*args: object) -> dict[str, torch.Tensor]:
        return {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in made(*args).items()}

    monkeypatch.setattr(fused_zoo, "stage_buffers", nan)


@pytest.mark.parametrize("mode", ["collective", "full"])
@pytest.mark.parametrize("arch", LONG_ARCHS)
@given(cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=2), at_ends=st.booleans())
@example(cuts=[0.0], at_ends=True)
@settings(max_examples=2, deadline=None)
def test_stages_per_copy_piece_score_as_one_launch(arch: str, mode: str, cuts: list[float], at_ends: bool) -> None:
    """Every user is served exactly once (the cold slot and lengths 0 .. long_len included): the pieced logits equal
    one launch's bit for bit, and ``on_chunk`` is called once per piece, then once after the last."""
    case = CASES[arch, mode]
    pieces = _pieces(case, cuts, at_ends)
    launched: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        _nan_buffers(mp)
        got = fused_logits(case, chunks=record_ends(pieces), on_chunk=launched.append)
    assert launched == list(range(len(pieces) + 1))
    torch.testing.assert_close(got, _one_launch(arch, mode), rtol=0, atol=0)


@functools.cache
def _one_launch(arch: str, mode: str) -> torch.Tensor:
    return fused_logits(CASES[arch, mode])


def test_a_launch_writes_only_its_users_rows() -> None:
    """A launch of one piece writes its users' rows of the shared output (as one launch over all users would) and
    leaves the other users' rows as they were."""
    case = CASES["twin", "collective"]
    cfg = case.resident.cfg
    short = entry_views(case.raw, case.layout, case.n_users, check_store(case.resident, case.layout))["short"]
    ends = _record_ends(case)
    cut = ends[len(ends) // 2]  # the users whose records end first are served by the launch (-1, cut]
    g = short.group
    pools = group_pools(case.resident, "short", (g.k_shared, g.v_shared), torch.float32)
    q = torch.randn(case.n_users, 2, cfg.d_attn, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = torch.full((case.n_users, 2, cfg.d_attn), 7.0, device=DEVICE)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        attend_group(case.raw, q, short, pools, cfg.n_heads, flags, config=EXACT, chunks=((-1, cut),), out=out)
        whole = attend_group(case.raw, q, short, pools, cfg.n_heads, flags, config=EXACT)
    served = (short.ends <= cut).cpu()
    assert (short.rows.cpu()[served] > 0).any() and not served.all()  # a user with history among the served
    assert torch.all(out.cpu()[~served] == 7.0)
    torch.testing.assert_close(out.cpu()[served], whole.cpu()[served], rtol=0, atol=0)


def test_a_split_launch_of_some_users_is_refused() -> None:
    """Split histories are combined over every row: a launch serving some users refuses to write a given out."""
    case = CASES["sdim", "collective"]
    view = entry_views(case.raw, case.layout, case.n_users, check_store(case.resident, case.layout))["long"]
    m, d_a = case.resident.cfg.sdim_hashes, case.resident.cfg.d_attn
    sums = torch.empty(case.n_users, m, d_a, device=DEVICE)
    targets = torch.zeros(case.n_users, m, dtype=torch.int64, device=DEVICE)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="parts 1"):
        bucket_sums(case.raw, view, torch.zeros(1, d_a, device=DEVICE), view.starts, 1, 4, targets, 1, flags,
                    parts=2, block_l=4, chunk=(-1, 100), out=sums)
    with pytest.raises(ValueError, match="contiguous fp32 out"):
        bucket_sums(case.raw, view, torch.zeros(1, d_a, device=DEVICE), view.starts, 1, 4, targets, 1, flags,
                    out=sums[:, :1])


@pytest.mark.parametrize(("heads", "blocks", "head_loop"), [(1, 2, False), (4, 4, False), (4, 4, True), (2, 1, True)])
def test_twin_scores_are_the_same_for_any_launch_shape(heads: int, blocks: int, head_loop: bool) -> None:
    """TWIN's scores with each program scoring several heads (as one tile, or head by head) and walking several
    blocks of rows (fewer programs a launch, the last walking past the window): every one written, head by head the
    same scores bit for bit; several heads as one tile may sum a head's products in another order on a GPU (fp32
    rounding). A long window of 300 rows is five blocks of 64."""
    case = packed("twin", "collective", "float32", seed=5, long_len=300)
    cfg = case.resident.cfg
    long = entry_views(case.raw, case.layout, case.n_users, check_store(case.resident, case.layout))["long"]
    pool_k = group_pools(case.resident, "long", (long.group.k_shared, long.group.v_shared), torch.float32)[0]
    q = torch.randn(case.n_users, 2, cfg.d_attn, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        want = group_scores(case.raw, q, long, pool_k, cfg.n_heads, flags)
        got = group_scores(case.raw, q, long, pool_k, cfg.n_heads, flags, heads_per_program=heads,
                           blocks_per_program=blocks, num_warps=4, head_loop=head_loop,
                           out=torch.full_like(want, float("nan")))
    exact = head_loop or heads == 1
    torch.testing.assert_close(got, want, **({"rtol": 0, "atol": 0} if exact else {}))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("concurrent", [True, False])
@pytest.mark.parametrize("arch", LONG_ARCHS)
def test_overlapped_zoo_graph_replays_to_the_one_piece_graph_on_cuda(arch: str, concurrent: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph copying the batch in pieces, each piece's stages launched once it lands (on streams of their own, or
    one after another), scores like the graph with one copy, over both ring buffers."""
    monkeypatch.setattr(copy_plan, "_MIN_CHUNK", 256)  # the small test batch still splits into pieces
    case = packed(arch, "collective", "float16", seed=8)
    batcher = HostBatcher(case.layout, pin=True)
    config = FusedConfig(pool_dtype="float32")
    graphs = [GraphedDecoder(case.resident, case.layout, n_users=case.n_users, pad_to=case.layout.max_len,
                             n_candidates=2, path="fused", overlap=k, concurrent=concurrent, fused=config)
              for k in (1, 3)]
    users = [*range(case.n_users - 1), 999]
    for seed in range(3):
        host = batcher.pack(users, case.records)
        assert len(graphs[1].pieces(graphs[1].copy_bytes(host))) > 1
        cand = torch.randint(1, N_ITEMS + 1, (case.n_users, 2), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            want, got = (g.run(host, cand).clone() for g in graphs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
