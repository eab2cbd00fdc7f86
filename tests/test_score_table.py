"""The key-score table (cachestore/score_table.py): the Triton kernel against the plain PyTorch math.

Runs compiled on CUDA, under Triton's interpreter on CPU (conftest), skipped where Triton is absent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cachestore.fused import fused_available
from cachestore.score_table import score_table, score_table_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")


@given(rows=st.integers(0, 40), entries=st.integers(1, 150), heads=st.sampled_from([1, 2, 3, 8]),
       dh=st.sampled_from([2, 8, 32]), pool_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 999))
@settings(max_examples=20, deadline=None)
def test_score_table_equals_the_math(rows: int, entries: int, heads: int, dh: int, pool_dtype: torch.dtype,
                                     seed: int) -> None:
    """T[r, m, h] = scale · q[r, h] · P[m, h] for every shape the kernel pads or masks: rows 0 and 1, pools
    smaller and larger than a block, a head count that is not a power of two, head dims under 16; fp16 and
    bf16 pool rows are taken exactly (widened to fp32, never the query rounded)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads * dh, generator=gen).to(DEVICE)
    pool = torch.randn(entries, heads * dh, generator=gen).to(pool_dtype).to(DEVICE)
    got = score_table(q, pool, heads, 0.37)
    assert got.shape == (rows, entries, heads) and got.dtype == torch.float32
    torch.testing.assert_close(got, score_table_reference(q, pool, heads, 0.37), rtol=1e-5, atol=1e-5)


def test_score_table_refuses_mismatched_widths() -> None:
    with pytest.raises(ValueError, match="do not share d_a"):
        score_table(torch.zeros(2, 16, device=DEVICE), torch.zeros(3, 8, device=DEVICE), 2, 1.0)
    with pytest.raises(ValueError, match="do not share d_a"):
        score_table(torch.zeros(2, 16, device=DEVICE), torch.zeros(3, 16, device=DEVICE), 3, 1.0)
