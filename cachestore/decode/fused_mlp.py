"""Every model's scoring MLP in one Triton launch (the head after the attention of a request).

The models end in ``model.blocks.build_mlp``'s shape: ``Linear(D0, H1) - ReLU - Dropout - Linear(H1, H2) - ReLU -
Dropout - Linear(H2, 1)`` over the concatenation of a few parts (din: attention | target embedding; SIM, ETA,
SDIM, TWIN: short | long | target; HSTU: hidden | target). At serving sizes (B·C 512 rows, D0 320, H1 200, H2 80)
cuBLAS runs it as a cat, three small fp32 GEMMs and two ReLUs, ~8 dependent kernels and ~25 µs of a request's
graph on an H200 (``benchmarks/serving_latency.py --profile``). :func:`mlp_logits` runs it as ONE kernel:

    program r — rows r·BR .. r·BR + BR - 1 of the parts (each (R, d_p), row-major, read in place: no cat)
      acc2 (BR, H2) = 0
      for each chunk j of BH1 hidden-1 units:
          h1 = relu(Σ_p part_p[rows] · W1[j, cols of p]ᵀ + b1[j])        (BR, BH1), never stored
          acc2 += h1 · W2[:, j]ᵀ
      logit[rows] = relu(acc2 + b2) · w3 + b3

fp32 throughout (``tl.dot`` with IEEE fp32 products: the same sums as the eager MLP up to their order).
Dropout is the identity at inference. Other MLP shapes (another depth, more than three parts) and machines
without Triton run the module itself (:func:`mlp_logits` falls back); the parity tests compare the two.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

try:  # Triton is optional: CUDA machines have it; CPU machines may run its interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

MAX_PARTS = 3
BLOCK_ROWS, BLOCK_K, BLOCK_H1 = 16, 32, 32  # rows per program, input columns and hidden-1 units per step


@dataclass(frozen=True)
class MLPWeights:
    """The fp32 weights of a two-hidden-layer head: w1 (H1, D0), b1 (H1,), w2 (H2, H1), b2 (H2,), w3 (H2,),
    b3 (1,) — contiguous views of the module's own parameters (no copy)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor


_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, MLPWeights | None] = weakref.WeakKeyDictionary()


def mlp_weights(mlp: nn.Module) -> MLPWeights | None:
    """The head's weights when ``mlp`` is ``build_mlp``'s two-hidden-layer shape in fp32 (else None: the
    module runs itself). Looked up once per module."""
    if mlp in _WEIGHTS:
        return _WEIGHTS[mlp]
    layers = list(mlp.children()) if isinstance(mlp, nn.Sequential) else []
    kinds = [type(m) for m in layers]
    shape = [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    weights = None
    if kinds == shape and all(m.bias is not None and m.weight.dtype == torch.float32 for m in layers[::3]):
        l1, l2, l3 = layers[0], layers[3], layers[6]
        if l3.out_features == 1:
            weights = MLPWeights(l1.weight.detach().contiguous(), l1.bias.detach(), l2.weight.detach().contiguous(),
                                 l2.bias.detach(), l3.weight.detach().reshape(-1), l3.bias.detach())
    _WEIGHTS[mlp] = weights
    return weights


def mlp_logits(mlp: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mlp(torch.cat(parts, -1)).squeeze(-1)`` for parts (..., d_p) of one shape but the last: logits (...,)
    fp32. One kernel (module docstring) when the head has the two-hidden-layer shape; the module otherwise.
    For the fused decode paths, where Triton runs on the parts' device (CUDA, or its interpreter).
    Shape-static and free of host syncs (graph-capturable)."""
    weights = mlp_weights(mlp)
    lead = parts[0].shape[:-1]
    widths = [p.shape[-1] for p in parts]
    if (weights is None or triton is None or len(parts) > MAX_PARTS or sum(widths) != weights.w1.shape[1]
            or any(p.dtype != torch.float32 or p.shape[:-1] != lead for p in parts)):
        return mlp(torch.cat(list(parts), dim=-1)).squeeze(-1)
    rows = [p.reshape(-1, p.shape[-1]) for p in parts]  # (R, d_p) each
    rows = [r if r.stride(-1) == 1 else r.contiguous() for r in rows]
    r_count = rows[0].shape[0]
    out = torch.empty(r_count, dtype=torch.float32, device=rows[0].device)
    while len(rows) < MAX_PARTS:  # absent parts: width 0, never read
        rows.append(rows[0][:, :0])
    h1, h2 = weights.w1.shape[0], weights.w2.shape[0]
    if r_count:
        _mlp_kernel[(triton.cdiv(r_count, BLOCK_ROWS),)](
            rows[0], rows[1], rows[2], rows[0].stride(0), rows[1].stride(0), rows[2].stride(0),
            weights.w1, weights.b1, weights.w2, weights.b2, weights.w3, weights.b3, out, r_count,
            DA=rows[0].shape[1], DB=rows[1].shape[1], DC=rows[2].shape[1], H1=h1, H2=h2,
            BH2=max(16, triton.next_power_of_2(h2)), BR=BLOCK_ROWS, BK=BLOCK_K, BH1=BLOCK_H1, num_warps=4,
        )
    return out.view(lead)


if triton is not None:

    @triton.jit
    def _part_into(acc, x_ptr, stride, rows, rmask, w1_ptr, units, umask, col0, D0: tl.constexpr,
                   D: tl.constexpr, BK: tl.constexpr):
        """acc (BR, BH1) += x[rows, 0:D] · W1[units, col0:col0 + D]ᵀ, BK input columns a step."""
        ks = tl.arange(0, BK)
        for k in range(0, D, BK):
            kk = k + ks
            kmask = kk < D
            x = tl.load(x_ptr + rows[:, None] * stride + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)  # (BR, BK)
            w = tl.load(w1_ptr + units[None, :] * D0 + (col0 + kk)[:, None], mask=kmask[:, None] & umask[None, :],
                        other=0.0)  # (BK, BH1) = W1[units, cols]ᵀ
            acc += tl.dot(x, w, input_precision="ieee")
        return acc

    @triton.jit
    def _mlp_kernel(a_ptr, b_ptr, c_ptr, sa, sb, sc, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, R,
                    DA: tl.constexpr, DB: tl.constexpr, DC: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr,
                    BH2: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BH1: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = rows < R
        outs = tl.arange(0, BH2)  # hidden-2 units
        omask = outs < H2
        D0: tl.constexpr = DA + DB + DC
        acc2 = tl.zeros((BR, BH2), dtype=tl.float32)
        for j in range(0, H1, BH1):
            units = j + tl.arange(0, BH1)
            umask = units < H1
            acc1 = tl.zeros((BR, BH1), dtype=tl.float32)
            acc1 = _part_into(acc1, a_ptr, sa, rows, rmask, w1_ptr, units, umask, 0, D0, DA, BK)
            if DB > 0:
                acc1 = _part_into(acc1, b_ptr, sb, rows, rmask, w1_ptr, units, umask, DA, D0, DB, BK)
            if DC > 0:
                acc1 = _part_into(acc1, c_ptr, sc, rows, rmask, w1_ptr, units, umask, DA + DB, D0, DC, BK)
            b1 = tl.load(b1_ptr + units, mask=umask, other=0.0)
            h1 = tl.maximum(acc1 + b1[None, :], 0.0)  # (BR, BH1); units past H1 are 0
            w2 = tl.load(w2_ptr + outs[None, :] * H1 + units[:, None], mask=umask[:, None] & omask[None, :],
                         other=0.0)  # (BH1, BH2) = W2[outs, units]ᵀ
            acc2 += tl.dot(h1, w2, input_precision="ieee")
        b2 = tl.load(b2_ptr + outs, mask=omask, other=0.0)
        w3 = tl.load(w3_ptr + outs, mask=omask, other=0.0)
        h2 = tl.maximum(acc2 + b2[None, :], 0.0)  # (BR, BH2)
        logit = tl.sum(h2 * w3[None, :], axis=1) + tl.load(b3_ptr)
        tl.store(out_ptr + rows, logit, mask=rmask)
