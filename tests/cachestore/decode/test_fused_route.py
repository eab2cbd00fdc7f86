"""The one-pass hard routing (cachestore/decode/fused_route.py) against ``model.routing.route`` of the logits.

Compiled on a CUDA machine; under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU);
skipped where Triton is absent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.fused import fused_available
from collectivekv.cachestore.decode.fused_route import CHUNK, route_argmax
from collectivekv.model.routing import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")


def check(h: torch.Tensor, weight: torch.Tensor) -> None:
    """The kernel's pick is torch's where the best logit leads the runner-up by more than fp32 rounding, and
    within that rounding of the best logit everywhere."""
    with torch.inference_mode():
        logits = torch.nn.functional.linear(h, weight)  # (..., S)
        want, got = route(logits).idx, route_argmax(h, weight)
    assert got.shape == want.shape and got.dtype == torch.int64
    flat = logits.reshape(-1, logits.shape[-1])
    top2 = flat.topk(min(2, flat.shape[-1]), dim=-1).values  # (N, ≤2)
    clear = (top2[:, 0] - top2[:, -1] > 1e-4) | (top2.shape[-1] == 1)
    assert torch.equal(got.reshape(-1)[clear], want.reshape(-1)[clear])
    picked = flat.gather(1, got.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(picked, top2[:, 0], rtol=0, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 70), e=st.integers(1, 40), s=st.integers(1, 2 * CHUNK + 70), seed=st.integers(0, 9))
def test_route_argmax_equals_route(n, e, s, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, e, generator=gen), torch.randn(s, e, generator=gen)
    check(h.to(DEVICE), w.to(DEVICE))


def test_ties_pick_the_first_row_across_chunks():
    """Equal router rows score equal logits: the first wins, within a chunk and across chunks (torch.max's rule)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2 * CHUNK + 5, 16, generator=gen)
    h = torch.randn(3, 2, 16, generator=gen)
    best = route(torch.nn.functional.linear(h, w)).idx.reshape(-1)  # (6,)
    w[CHUNK + 3] = w[best[0]]  # a copy in another chunk, after the original
    w[2 * CHUNK + 1] = w[best[1]]
    w[best[2] + 1 if best[2] + 1 < CHUNK else best[2] - 1] = w[best[2]]  # one in the same chunk
    with torch.inference_mode():
        got = route_argmax(h.to(DEVICE), w.to(DEVICE)).cpu()
        want = route(torch.nn.functional.linear(h, w)).idx
    assert got.shape == (3, 2)
    assert torch.equal(got, want)


def test_gradient_and_other_dtypes_take_the_torch_ops():
    """A router that trains, or a half-precision one, is routed by the torch ops (same result)."""
    h = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(30, 8, device=DEVICE)
    assert torch.equal(route_argmax(h, w), route(torch.nn.functional.linear(h, w)).idx)
    hh, wh = h.detach().double(), w.double()
    assert torch.equal(route_argmax(hh, wh), route(torch.nn.functional.linear(hh, wh)).idx)
    empty = route_argmax(torch.zeros(0, 4, 8, device=DEVICE), w)
    assert empty.shape == (0, 4)
