"""The two-kernel scoring MLP (cachestore/decode/fused_mlp.py) against the models' head (``model.ctr.mlp_head``).

Compiled on a CUDA machine; under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU);
skipped where Triton is absent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from collectivekv.cachestore.decode.fused import fused_available
from collectivekv.cachestore.decode.fused_mlp import head_weights, mlp_logits
from collectivekv.model.ctr import build_mlp, mlp_head

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")


def head(d_in: int, dims: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_mlp(d_in, dims, dropout=0.3).eval().to(DEVICE)


@settings(max_examples=12, deadline=None)
@given(widths=st.lists(st.integers(1, 70), min_size=1, max_size=3), h1=st.integers(1, 90), h2=st.integers(1, 40),
       rows=st.integers(1, 40), cands=st.integers(1, 3), seed=st.integers(0, 9))
def test_kernel_equals_the_models_head(widths, h1, h2, rows, cands, seed):
    mlp = head(sum(widths), (h1, h2), seed)
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(rows, cands, w, generator=gen).to(DEVICE) for w in widths]
    with torch.inference_mode():
        want, got = mlp_head(mlp, parts), mlp_logits(mlp, parts)
    assert head_weights(mlp) is not None  # the kernel ran, not the fallback
    assert got.shape == want.shape == (rows, cands)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_paper_shape_and_strided_parts():
    """din's head at B 64: attention (B, 1, 256) | target (B, 1, 64), the target a strided slice."""
    mlp = head(320, (200, 80), 0)
    attn = torch.randn(64, 1, 256, device=DEVICE)
    wide = torch.randn(64, 1, 100, device=DEVICE)
    target = wide[..., 10:74]  # row stride 100, unit column stride
    with torch.inference_mode():
        torch.testing.assert_close(mlp_logits(mlp, [attn, target]), mlp_head(mlp, [attn, target]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [(16,), (16, 8, 4)])
def test_other_depths_run_the_module(dims):
    mlp = head(24, dims, 1)
    parts = [torch.randn(5, 2, 24, device=DEVICE)]
    assert head_weights(mlp) is None
    with torch.inference_mode():
        assert torch.equal(mlp_logits(mlp, parts), mlp_head(mlp, parts))


def test_four_parts_and_half_precision_run_the_module():
    mlp = head(16, (8, 4), 2)
    four = [torch.randn(3, 1, 4, device=DEVICE) for _ in range(4)]
    with torch.inference_mode():
        assert torch.equal(mlp_logits(mlp, four), mlp_head(mlp, four))
        half = head(16, (8, 4), 2).half()
        parts = [torch.randn(3, 1, 16, device=DEVICE).half()]
        assert torch.equal(mlp_logits(half, parts), mlp_head(half, parts))


def test_weights_follow_the_parameters():
    """The transposed copies are remade when a parameter changes in place (a model trained on after serving)."""
    mlp = head(12, (8, 4), 4)
    parts = [torch.randn(6, 1, 12, device=DEVICE)]
    with torch.inference_mode():
        mlp_logits(mlp, parts)
    with torch.no_grad():
        mlp[0].weight.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(mlp_logits(mlp, parts), mlp_head(mlp, parts), rtol=1e-5, atol=1e-5)


def test_weights_follow_new_storage():
    """Parameters given new storage without a version bump (``.data =``, as ``Module.to`` does) get new copies."""
    mlp = head(12, (8, 4), 6)
    parts = [torch.randn(3, 1, 12, device=DEVICE)]
    with torch.inference_mode():
        mlp_logits(mlp, parts)
    mlp[0].weight.data = mlp[0].weight.data * 2
    with torch.inference_mode():
        torch.testing.assert_close(mlp_logits(mlp, parts), mlp_head(mlp, parts), rtol=1e-5, atol=1e-5)


def test_training_and_gradients_run_the_module():
    mlp = head(12, (8, 4), 7)
    parts = [torch.randn(3, 1, 12, device=DEVICE, requires_grad=True)]
    out = mlp_logits(mlp, parts)  # a gradient is wanted: the module, so it flows back
    out.sum().backward()
    assert parts[0].grad is not None and parts[0].grad.abs().sum() > 0
    mlp.train()
    torch.manual_seed(0)
    want = mlp_head(mlp, [parts[0].detach()])
    torch.manual_seed(0)
    assert torch.equal(mlp_logits(mlp, [parts[0].detach()]), want)  # dropout as the module draws it


def test_a_model_made_in_inference_mode():
    with torch.inference_mode():
        mlp = head(12, (8, 4), 5)
        parts = [torch.randn(4, 1, 12, device=DEVICE)]
        torch.testing.assert_close(mlp_logits(mlp, parts), mlp_head(mlp, parts), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    mlp = head(8, (4, 4), 3)
    with torch.inference_mode():
        assert mlp_logits(mlp, [torch.zeros(0, 1, 8, device=DEVICE)]).shape == (0, 1)
