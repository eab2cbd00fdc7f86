"""Hard routing of the candidates in one pass over the router (Triton): ``argmax(h · Wᵀ)`` without the logits.

HSTU's decode routes every candidate in every layer (``HSTU.decode``: ``route(linear(h, W)).idx``, W the router
(S, E), S the pool's 10,000 rows at the paper's shape). In torch that is an fp32 GEMM writing (N, S) logits and a
max over them: at N = 512 about 27 + 11 µs per branch on an H200 (``benchmarks/zoo_kernel_breakdown.py``), and in
the second layer on the request's critical path. :func:`route_argmax` computes the same indices in two kernels that
never write the logits:

    scores  program (r, j) — rows r·BR .., router rows j·CHUNK .. j·CHUNK + CHUNK - 1:
              s = h[rows] · W[cols]ᵀ (fp32, IEEE products, BM router rows a step), the best (value, first column)
              per row → key[j, rows] = order(value) · 2^32 + (2^31 - 1 - column)
    reduce  program r — rows r·BR ..: the largest key over j → column

``order`` maps an fp32 to an int32 of the same order (``fused_select``'s trick), so the largest key is the largest
value and, among equal values, the smallest column: ``torch.max``'s first occurrence. The sums run in another
order than cuBLAS's, so two logits within fp32 rounding of each other may rank the other way: the parity tests
compare with the model's forward at the serving tolerances. Rows that need a gradient, other dtypes and machines
without Triton take ``model.routing.route`` itself (:func:`route_argmax` decides). Tested against it in
``tests/cachestore/decode/test_fused_route.py`` (compiled on CUDA, under Triton's interpreter on CPU).
"""

from __future__ import annotations

import torch

from collectivekv.cachestore.decode.fused import fused_available, triton
from collectivekv.model.routing import route

BR, BM, CHUNK = 32, 64, 512  # rows per program, router rows per step, router rows per program

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _route_scores_kernel(h_ptr, w_ptr, key_ptr, n_rows, n_logits, E: tl.constexpr, E_P2: tl.constexpr,
                             BR: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # (BR,)
        rmask = rows < n_rows
        es = tl.arange(0, E_P2)
        emask = es < E
        h = tl.load(h_ptr + rows[:, None] * E + es[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
        best = tl.full([BR], float("-inf"), tl.float32)
        col = tl.zeros([BR], dtype=tl.int32)
        first = tl.program_id(1) * CHUNK
        for j in range(0, CHUNK, BM):  # a static bound (Triton's CPU interpreter)
            ms = first + j + tl.arange(0, BM)  # (BM,) router rows
            mmask = ms < n_logits
            w = tl.load(w_ptr + ms[None, :] * E + es[:, None], mask=emask[:, None] & mmask[None, :], other=0.0)
            s = tl.dot(h, w, input_precision="ieee")  # (BR, BM) logits
            s = tl.where(mmask[None, :], s, float("-inf"))
            top = tl.max(s, axis=1)
            better = top > best  # strictly: an earlier column keeps a tie
            col = tl.where(better, first + j + tl.argmax(s, axis=1, tie_break_left=True), col)
            best = tl.where(better, top, best)
        bits = (best + 0.0).to(tl.int32, bitcast=True)  # -0.0 ranks as 0.0
        order = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed int32 order == float order
        key = (order.to(tl.int64) << 32) | (0x7FFFFFFF - col).to(tl.int64)
        tl.store(key_ptr + tl.program_id(1) * n_rows + rows, key, mask=rmask)

    @triton.jit
    def _route_reduce_kernel(key_ptr, idx_ptr, n_rows, N_CHUNKS: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = rows < n_rows
        best = tl.load(key_ptr + rows, mask=rmask, other=0)
        for j in range(1, N_CHUNKS):
            best = tl.maximum(best, tl.load(key_ptr + j * n_rows + rows, mask=rmask, other=0))
        tl.store(idx_ptr + rows, 0x7FFFFFFF - (best & 0x7FFFFFFF), mask=rmask)


def route_argmax(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``model.routing.route(linear(h, weight)).idx``: the router row with the largest logit for every row of h
    (..., E), weight (S, E): int64 (...,), ties the first row. The two kernels of the module docstring where they
    apply (fp32 h and weight on a device Triton runs on, no gradient wanted), the torch ops otherwise.
    Shape-static and free of host syncs (graph-capturable)."""
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if (grad or h.dtype != torch.float32 or weight.dtype != torch.float32 or h.device != weight.device
            or not fused_available(h.device) or weight.dim() != 2 or h.shape[-1] != weight.shape[1]):
        return route(torch.nn.functional.linear(h, weight)).idx
    lead = h.shape[:-1]
    rows = h.reshape(-1, h.shape[-1]).contiguous()  # (N, E)
    n, e = rows.shape
    idx = torch.empty(n, dtype=torch.int64, device=h.device)
    if n == 0:
        return idx.view(lead)
    chunks = triton.cdiv(weight.shape[0], CHUNK)
    keys = torch.empty(chunks, n, dtype=torch.int64, device=h.device)  # (chunks, N)
    _route_scores_kernel[(triton.cdiv(n, BR), chunks)](
        rows, weight.detach().contiguous(), keys, n, weight.shape[0], E=e, E_P2=max(16, triton.next_power_of_2(e)),
        BR=BR, BM=BM, CHUNK=CHUNK, num_warps=4)
    _route_reduce_kernel[(triton.cdiv(n, BR),)](keys, idx, n, N_CHUNKS=chunks, BR=BR, num_warps=1)
    return idx.view(lead)
