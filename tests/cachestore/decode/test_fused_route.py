"""Hard routing without the logits (cachestore/decode/fused_route.py) against ``model.routing.route`` of the fp32
logits: random routers of every shape, exact ties (the lowest column wins, within and across spans), near-ties
that the scan cannot separate (rescored in IEEE fp32), and a third contender in one span (every column rescored).
On CPU under Triton's interpreter (``tf32x3`` runs as fp32 there: the pick's paths still run); on CUDA compiled,
where the scan runs on tensor cores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.fused import fused_available
from collectivekv.cachestore.decode.fused_route import MAX_WIDTH, SCAN_BN, route_rows, router_bound, scan_shape
from collectivekv.model.routing import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The models' routing: argmax of the fp32 logits, ties to the lowest column."""
    return route(torch.nn.functional.linear(x, w)).idx


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), m=st.integers(1, 700), e=st.integers(1, 72), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       seed=st.integers(0, 2**31 - 1), precision=st.sampled_from(["tf32x3", "ieee"]))
def test_route_rows_is_the_argmax_of_the_logits(n: int, m: int, e: int, scale: float, seed: int,
                                                precision: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, e, generator=g) * scale).to(DEVICE)
    w = (torch.randn(m, e, generator=g) / e**0.5).to(DEVICE)
    assert torch.equal(route_rows(x, w, precision=precision), reference(x, w))


@pytest.mark.parametrize("copies", [(3, 4), (3, SCAN_BN + 9, 2 * SCAN_BN + 1), (0, 5, 6, 7)])
def test_equal_logits_route_to_the_lowest_column(copies: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3 * SCAN_BN, 16, generator=g)
    w[list(copies)] = w[copies[0]].clone()  # identical columns: identical logits on every path
    x = torch.cat([w[copies[0]].expand(4, 16), torch.randn(5, 16, generator=g)])  # 4 rows pick a copy
    got = route_rows(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert got[:4].tolist() == [copies[0]] * 4
    assert torch.equal(got, reference(x, w))


def near_ties(n_close: int, gap: float) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One row x and a router whose columns 10, 20, ... (``n_close`` of them, one span) score within ``gap`` of
    each other, far above the rest; returns their columns too."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(SCAN_BN, 32, generator=g) * 0.01
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    close = [10 * (i + 1) for i in range(n_close)]
    for i, c in enumerate(close):
        w[c, 0] = 5.0 + gap * (i % 2 - 0.5) * (i + 1) / n_close  # 5 ± a fraction of gap
    return x, w, close


@pytest.mark.parametrize("n_close", [2, 3, 6])
@pytest.mark.parametrize("gap", [0.0, 1e-7, 1e-5])
def test_contenders_within_the_margin_are_rescored(n_close: int, gap: float) -> None:
    """Logits within the scan's margin of the best (margin here ~ (2·32 + 8)·2⁻²²·5 ≈ 9e-5): two are kept and
    rescored; three or more in one span make the pick rescore every column. Either way the fp32 argmax."""
    x, w, close = near_ties(n_close, gap)
    assert scan_shape(1, w.shape[0], 32)[2] == 1  # one span holds every contender
    got = route_rows(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert torch.equal(got, reference(x, w)) and int(got[0]) in close


def test_batched_candidates_and_bad_shapes() -> None:
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 3, 64, generator=g), torch.randn(1000, 64, generator=g) / 8
    got = route_rows(x.reshape(-1, 64).to(DEVICE), w.to(DEVICE), router_bound(w.to(DEVICE))).view(6, 3)
    assert torch.equal(got.cpu(), reference(x, w))
    assert route_rows(x[:0, 0].to(DEVICE), w.to(DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="route_rows"):
        route_rows(x[:, 0].to(DEVICE), w[:, :10].to(DEVICE))


@pytest.mark.parametrize(("n", "m", "e"), [(70, 300, 128), (40, 200, 256), (3, 100, 300), (20, 70, MAX_WIDTH)])
def test_wide_routers_take_smaller_tiles(n: int, m: int, e: int) -> None:
    """Embedding widths past 64 scan in narrower tiles (the scan's shared memory): the same argmax."""
    g = torch.Generator().manual_seed(e)
    x, w = torch.randn(n, e, generator=g), torch.randn(m, e, generator=g) / e**0.5
    bm, bn, _, _ = scan_shape(n, m, e)
    assert bm * max(e, 16) <= 2 * 8192 and bn <= SCAN_BN
    assert torch.equal(route_rows(x.to(DEVICE), w.to(DEVICE)).cpu(), reference(x, w))
    with pytest.raises(ValueError, match="width"):
        route_rows(torch.zeros(1, 2 * MAX_WIDTH, device=DEVICE), torch.zeros(3, 2 * MAX_WIDTH, device=DEVICE))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows, as intended
def test_a_nan_or_an_overflowing_logit_still_routes_to_a_column() -> None:
    """A NaN input or logits overflowing to inf leave no finite bound: the row is rescored whole and its index is
    a column of the router (the largest logit where one is +inf, as torch's max)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 8, generator=g)
    x = torch.randn(2, 8, generator=g)
    x[0, 0] = float("nan")
    got = route_rows(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert 0 <= int(got[0]) < 20 and int(got[1]) == int(reference(x, w)[1])
    x2, w2 = torch.full((1, 8), 1e19), torch.randn(50, 8, generator=g) * 1e19  # finite inputs, logits overflow
    assert torch.equal(route_rows(x2.to(DEVICE), w2.to(DEVICE)).cpu(), reference(x2, w2))


@cuda
@pytest.mark.parametrize(("n", "e"), [(1, 64), (64, 64), (512, 64), (4096, 64), (512, 128), (512, 256), (64, 512)])
def test_tensor_core_scan_routes_as_fp32_at_serving_shapes(n: int, e: int) -> None:
    """HSTU's serving shape (pool 10,000, embed 64; wider embeddings too), routers at the training init's scale
    and 10× it: every row picks cuBLAS's fp32 argmax, or (two fp32 summation orders apart) a column whose exact
    logit is within fp32 rounding of it."""
    g = torch.Generator(device="cuda").manual_seed(n)
    for scale in (1.0, 10.0):
        x = torch.nn.functional.layer_norm(torch.randn(n, e, device="cuda", generator=g), (e,))
        w = torch.randn(10_000, e, device="cuda", generator=g) * scale / e**0.5
        got, want = route_rows(x, w, router_bound(w)), reference(x, w)
        exact = x.double() @ w.double().T  # (n, 10,000)
        apart = torch.nonzero(got != want).flatten()
        gap = (exact[apart, want[apart]] - exact[apart, got[apart]]).abs()
        assert len(apart) <= max(1, n // 1000) and bool((gap <= 1e-5 * scale).all()), (apart, gap)
