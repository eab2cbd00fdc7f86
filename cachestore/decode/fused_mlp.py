"""Every model's scoring MLP in two Triton launches (the head after the attention of a request).

The models end in ``model.ctr.build_mlp``'s shape: ``Linear(D0, H1) - ReLU - Dropout - Linear(H1, H2) - ReLU -
Dropout - Linear(H2, 1)`` over the concatenation of a few parts (din: attention | target embedding; SIM, ETA,
SDIM, TWIN: short | long | target; HSTU: hidden | target). At serving sizes (B·C rows up to 512, D0 320, H1 200,
H2 80) cuBLAS runs it as a cat, three small fp32 GEMMs, two ReLUs and a bias add: 7 dependent kernels, ~23 µs of a
resident request's graph on an H200 (``benchmarks/serving_latency.py --profile``). :func:`mlp_logits` runs it as

    hidden  program (r, j) — rows r·BR .., hidden-1 units j·BH ..:
              h1[rows, units] = relu(Σ_p part_p[rows] · W1ᵀ[cols of p, units] + b1[units])   (parts read in place)
    output  program r — rows r·BR ..:
              logit[rows] = relu(h1[rows] · W2ᵀ + b2) · w3 + b3

fp32 throughout (``tl.dot`` with IEEE fp32 products: the eager MLP's sums up to their order), the weights read
from transposed copies (W1ᵀ (D0, H1), W2ᵀ (H1, H2): each tile load is contiguous along the output units) made
once per module and remade when a parameter changes (earlier copies stay alive: a captured graph reads them).
Dropout is the identity at inference. Other MLP shapes (another depth, more than three parts, another dtype), a
module in training mode and machines without Triton run the module itself; the parity tests compare the two.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from collectivekv.model.ctr import mlp_head

try:  # Triton is optional: CUDA machines have it; CPU machines may run its interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

MAX_PARTS = 3
BR, BH, BK = 16, 64, 32  # rows per program, hidden-1 units per program, input columns per step
SHAPE = [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]


@dataclass(frozen=True)
class HeadWeights:
    """w1t (D0, H1), b1 (H1,), w2t (H1, H2), b2 (H2,), w3 (H2,), b3 (1,) fp32 contiguous; ``key``: the parameters'
    storage addresses and versions they were copied at (version -1 for inference tensors, which keep none: a model
    made under ``torch.inference_mode`` is taken as fixed unless its storage changes); ``params``: the parameters
    themselves, held so that no other tensor reuses their addresses while this entry lives."""

    w1t: torch.Tensor
    b1: torch.Tensor
    w2t: torch.Tensor
    b2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    key: tuple[int, ...]
    params: tuple[torch.Tensor, ...]


# every copy made for a module stays alive with it: a CUDA graph captured over one reads its addresses on every
# replay, even after the module's weights change and a newer copy serves eager calls (weights change rarely)
_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, list[HeadWeights]] = weakref.WeakKeyDictionary()


def head_weights(mlp: nn.Module) -> HeadWeights | None:
    """The kernel's weights of ``mlp`` when it has ``build_mlp``'s two-hidden-layer shape in fp32, else None
    (None too while a CUDA graph is being captured and no copy of the current weights exists yet: a copy made
    then would be filled only when the graph replays)."""
    layers = list(mlp.children()) if isinstance(mlp, nn.Sequential) else []
    if [type(m) for m in layers] != SHAPE or layers[6].out_features != 1:
        return None
    linears = layers[::3]
    if any(m.bias is None or m.weight.dtype != torch.float32 for m in linears):
        return None
    params = tuple(p for m in linears for p in (m.weight, m.bias))
    key = tuple(x for p in params for x in (p.data_ptr(), -1 if p.is_inference() else p._version))
    copies = _WEIGHTS.setdefault(mlp, [])
    if copies and copies[-1].key == key:
        return copies[-1]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None
    params = tuple(p.detach() for p in params)
    w1, b1, w2, b2, w3, b3 = params
    copies.append(HeadWeights(w1.t().contiguous(), b1.contiguous(), w2.t().contiguous(), b2.contiguous(),
                              w3.reshape(-1).contiguous(), b3.contiguous(), key, params))
    return copies[-1]


def mlp_logits(mlp: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``model.ctr.mlp_head(mlp, parts)``: logits (...,) of parts (..., d_p) (one shape but the last) — by the
    two kernels of the module docstring where they apply, the module otherwise (also in training mode or where a
    gradient is wanted). For the fused decode paths (Triton
    runs on the parts' device: CUDA, or its interpreter). Shape-static and free of host syncs (graph-capturable)."""
    trains = mlp.training or (torch.is_grad_enabled() and any(p.requires_grad for p in parts))
    weights = head_weights(mlp) if triton is not None and len(parts) <= MAX_PARTS and not trains else None
    lead = parts[0].shape[:-1]
    if (weights is None or sum(p.shape[-1] for p in parts) != weights.w1t.shape[0]
            or any(p.dtype != torch.float32 or p.shape[:-1] != lead for p in parts)):
        return mlp_head(mlp, parts)
    rows = [p.reshape(-1, p.shape[-1]) for p in parts]  # (R, d_p) each
    rows = [r if r.stride(-1) == 1 else r.contiguous() for r in rows]
    rows += [rows[0][:, :0]] * (MAX_PARTS - len(rows))  # absent parts: width 0, never read
    n, h1, h2 = rows[0].shape[0], weights.w1t.shape[1], weights.w2t.shape[1]
    out = torch.empty(n, dtype=torch.float32, device=rows[0].device)
    if n:
        hidden = torch.empty(n, h1, dtype=torch.float32, device=out.device)  # (R, H1)
        _hidden_kernel[(triton.cdiv(n, BR), triton.cdiv(h1, BH))](
            rows[0], rows[1], rows[2], rows[0].stride(0), rows[1].stride(0), rows[2].stride(0), weights.w1t,
            weights.b1, hidden, n, DA=rows[0].shape[1], DB=rows[1].shape[1], DC=rows[2].shape[1], H1=h1,
            BR=BR, BH=BH, BK=BK, num_warps=4)
        _output_kernel[(triton.cdiv(n, BR),)](
            hidden, weights.w2t, weights.b2, weights.w3, weights.b3, out, n, H1=h1, H2=h2,
            BH2=max(16, triton.next_power_of_2(h2)), BR=BR, BK=BK, num_warps=4)
    return out.view(lead)


if triton is not None:

    @triton.jit
    def _part_into(acc, x_ptr, stride, rows, rmask, w_ptr, units, umask, col0, D: tl.constexpr, H: tl.constexpr,
                   BK: tl.constexpr):
        """acc (BR, BH) += x[rows, 0:D] · Wᵀ[col0:col0 + D, units], BK input columns a step."""
        ks = tl.arange(0, BK)
        for k in range(0, D, BK):
            kk = k + ks
            kmask = kk < D
            x = tl.load(x_ptr + rows[:, None] * stride + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)  # (BR, BK)
            w = tl.load(w_ptr + (col0 + kk)[:, None] * H + units[None, :], mask=kmask[:, None] & umask[None, :],
                        other=0.0)  # (BK, BH), contiguous along units
            acc += tl.dot(x, w, input_precision="ieee")
        return acc

    @triton.jit
    def _hidden_kernel(a_ptr, b_ptr, c_ptr, sa, sb, sc, w1t_ptr, b1_ptr, h_ptr, R, DA: tl.constexpr,
                       DB: tl.constexpr, DC: tl.constexpr, H1: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr,
                       BK: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = rows < R
        units = tl.program_id(1) * BH + tl.arange(0, BH)
        umask = units < H1
        acc = tl.zeros((BR, BH), dtype=tl.float32)
        acc = _part_into(acc, a_ptr, sa, rows, rmask, w1t_ptr, units, umask, 0, DA, H1, BK)
        if DB > 0:
            acc = _part_into(acc, b_ptr, sb, rows, rmask, w1t_ptr, units, umask, DA, DB, H1, BK)
        if DC > 0:
            acc = _part_into(acc, c_ptr, sc, rows, rmask, w1t_ptr, units, umask, DA + DB, DC, H1, BK)
        h = tl.maximum(acc + tl.load(b1_ptr + units, mask=umask, other=0.0)[None, :], 0.0)
        tl.store(h_ptr + rows[:, None] * H1 + units[None, :], h, mask=rmask[:, None] & umask[None, :])

    @triton.jit
    def _output_kernel(h_ptr, w2t_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, R, H1: tl.constexpr, H2: tl.constexpr,
                       BH2: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = rows < R
        outs = tl.arange(0, BH2)
        omask = outs < H2
        acc = tl.zeros((BR, BH2), dtype=tl.float32)
        acc = _part_into(acc, h_ptr, H1, rows, rmask, w2t_ptr, outs, omask, 0, H1, H2, BK)
        h2 = tl.maximum(acc + tl.load(b2_ptr + outs, mask=omask, other=0.0)[None, :], 0.0)  # (BR, BH2)
        logit = tl.sum(h2 * tl.load(w3_ptr + outs, mask=omask, other=0.0)[None, :], axis=1) + tl.load(b3_ptr)
        tl.store(out_ptr + rows, logit, mask=rmask)
