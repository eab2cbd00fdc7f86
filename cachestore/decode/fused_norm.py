"""LayerNorm of a sum of partial results, gated, in one launch (Triton): HSTU's ``norm_out(attn) ⊙ u``.

An HSTU layer ends ``x + W_o(LayerNorm(attn) ⊙ u)`` (:meth:`model.hstu.HSTULayer.update`), where the fused decode's
attention arrives as S partial sums over the history (one per part a history is split into,
:func:`cachestore.decode.fused_hstu.hstu_history`). As torch ops that is a sum over the parts, the LayerNorm and the
product: three launches on the request's critical path per layer. :func:`norm_gate` is one:

    program r:  a = Σ_s parts[s, r, :]  (fp32, parts in order)
                out[r, :] = ((a - mean(a)) / √(var(a) + eps) · weight + bias) · u[r, :]     (biased variance, as torch)

``tests/cachestore/decode/test_fused_hstu.py`` checks it against ``layer_norm(parts.sum(0)) * u``.
"""

from __future__ import annotations

import torch
from torch import nn

from collectivekv.cachestore.decode.fused import tl, triton

if triton is not None:

    @triton.jit
    def _norm_gate_kernel(parts_ptr, u_ptr, u_stride, w_ptr, b_ptr, out_ptr, n_rows, eps, S: tl.constexpr,
                          D: tl.constexpr, DP2: tl.constexpr, WEIGHT: tl.constexpr, BIAS: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, DP2)  # (DP2,)
        inside = cols < D
        a = tl.zeros([DP2], dtype=tl.float32)
        for s in tl.static_range(S):
            a += tl.load(parts_ptr + (s * n_rows + row) * D + cols, mask=inside, other=0.0)
        mean = tl.sum(a, axis=0) / D
        centred = tl.where(inside, a - mean, 0.0)
        y = centred / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
        if WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if BIAS:
            y = y + tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        gate = tl.load(u_ptr + row * u_stride + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + cols, y * gate, mask=inside)


def norm_gate(parts: torch.Tensor, norm: nn.LayerNorm, u: torch.Tensor) -> torch.Tensor:
    """``norm(parts.sum(0)) * u`` (..., D) at u's dtype in one launch (module docstring): parts (S, ..., D) fp32
    contiguous, u (..., D) with unit column stride and one row stride over its leading dims (a view into a wider
    projection output is read in place), ``norm`` a LayerNorm over the last dim D."""
    *lead, d = u.shape
    rows = parts[0].numel() // d
    if parts.shape[1:] != u.shape or tuple(norm.normalized_shape) != (d,):
        raise ValueError(f"norm_gate: parts {tuple(parts.shape)}, gate {tuple(u.shape)}, norm {norm.normalized_shape}")
    u_rows = u.reshape(rows, d)  # a view where the layout allows (a column range of a wider output)
    if u_rows.stride(-1) != 1:
        u_rows = u_rows.contiguous()
    out = torch.empty(rows, d, dtype=u.dtype, device=u.device)
    if rows:
        weight = out if norm.weight is None else norm.weight  # out: a pointer left unread
        bias = out if norm.bias is None else norm.bias
        _norm_gate_kernel[(rows,)](parts.contiguous(), u_rows, u_rows.stride(0), weight, bias, out, rows,
                                   float(norm.eps), S=parts.shape[0], D=d, DP2=triton.next_power_of_2(d),
                                   WEIGHT=norm.weight is not None, BIAS=norm.bias is not None,
                                   num_warps=2 if d <= 512 else 4)
    return out.view(*lead, d)
