"""The zoo's short and long stages launched once per copy piece (cachestore/decode/fused_zoo_long.py): each launch
serves the users whose records end in its byte range, and the logits are exactly those of one launch for every
user, wherever the cuts fall. On CPU under Triton's interpreter, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.copy_plan import record_ends
from collectivekv.cachestore.decode.fused import attend_group, fused_available
from collectivekv.cachestore.decode.fused_long import bucket_sums
from collectivekv.cachestore.decode.fused_zoo import check_store, entry_views, group_pools, zoo_static_decode
from collectivekv.cachestore.decode.fused_zoo_long import long_buffers
from collectivekv.model.config import LONG_ARCHS
from tests.cachestore.decode.test_fused_zoo import DEVICE, EXACT, Case, packed

pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
CASES = {(arch, mode): packed(arch, mode, "float32", seed=3) for arch in LONG_ARCHS for mode in ("collective", "full")}


def _logits(case: Case, **kw: object) -> torch.Tensor:
    with torch.inference_mode():
        return zoo_static_decode(case.raw, case.candidates.to(DEVICE), resident=case.resident, layout=case.layout,
                                 n_users=case.n_users, config=EXACT, **kw).cpu()


def _pieces(case: Case, cuts: list[int]) -> list[tuple[int, int]]:
    """Copy pieces cut at the batch header plus ``cuts`` bytes (inside records, on their ends, past the batch)."""
    header, size = 16 * case.n_users, case.raw.numel()
    edges = sorted({0, size, *(header + c for c in cuts if header + c < size)})
    return list(zip(edges[:-1], edges[1:], strict=True))


@pytest.mark.parametrize("mode", ["collective", "full"])
@pytest.mark.parametrize("arch", LONG_ARCHS)
@given(cuts=st.lists(st.integers(0, 6000), max_size=3))
@settings(max_examples=4, deadline=None)
def test_stages_per_copy_piece_score_as_one_launch(arch: str, mode: str, cuts: list[int]) -> None:
    """Every user is served exactly once (the cold slot and lengths 0 .. long_len included): the pieced logits equal
    one launch's bit for bit, and ``on_chunk`` is called once per piece, then once after the last."""
    case = CASES[arch, mode]
    pieces = _pieces(case, cuts)
    launched: list[int] = []
    got = _logits(case, chunks=record_ends(pieces), on_chunk=launched.append)
    assert launched == list(range(len(pieces) + 1))
    torch.testing.assert_close(got, _logits(case), rtol=0, atol=0)


def test_a_launch_writes_only_its_users_rows() -> None:
    """A launch of one piece leaves the other users' rows of the shared output as they were."""
    case = CASES["twin", "collective"]
    cfg = case.resident.cfg
    views = entry_views(case.raw, case.layout, case.n_users, check_store(case.resident, case.layout))
    short = views["short"]
    first_end = int(short.ends.min())  # the records ending first: served by the launch (-1, first_end]
    g = short.group
    pools = group_pools(case.resident, "short", (g.k_shared, g.v_shared), torch.float32)
    q = torch.randn(case.n_users, 2, cfg.d_attn, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = torch.full((case.n_users, 2, cfg.d_attn), 7.0, device=DEVICE)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        attend_group(case.raw, q, short, pools, cfg.n_heads, flags, config=EXACT, chunks=((-1, first_end),), out=out)
        whole = attend_group(case.raw, q, short, pools, cfg.n_heads, flags, config=EXACT)
    served = (short.ends <= first_end).cpu()
    assert served.any() and not served.all()
    assert torch.all(out.cpu()[~served] == 7.0)
    torch.testing.assert_close(out.cpu()[served], whole.cpu()[served], rtol=0, atol=0)


def test_a_split_launch_of_some_users_is_refused() -> None:
    """Split histories are combined over every row: a launch serving some users refuses to write a given out."""
    case = CASES["sdim", "collective"]
    store_cfg = check_store(case.resident, case.layout)
    view = entry_views(case.raw, case.layout, case.n_users, store_cfg)["long"]
    sums = long_buffers(case.resident.cfg, case.n_users, 1, view.group.cap, torch.device(DEVICE))["sums"]
    targets = torch.zeros(case.n_users, sums.shape[1], dtype=torch.int64, device=DEVICE)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="parts 1"):
        bucket_sums(case.raw, view, torch.zeros(1, sums.shape[-1], device=DEVICE), view.starts, 1, 4, targets, 1,
                    flags, parts=2, block_l=4, chunk=(-1, 100), out=sums)
