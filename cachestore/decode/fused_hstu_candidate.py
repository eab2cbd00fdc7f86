"""The HSTU candidates' own work per layer in the fused decode (``cachestore.decode.fused_hstu``).

Per layer, from h = LayerNorm(x) (b, C, E) of the candidates, :meth:`model.hstu.HSTULayer.project` with hard routing
computes u, q = SiLU(W_uq h + b_uq), the K and V user parts SiLU(W_k h), SiLU(W_v h) (d_u columns each; int8 branches
fake-quantise them with their scale; d_a columns where a side is not shared) and, per shared side, the router's
argmax into its pool. Here:

    z = SiLU(h · [W_uq; W_k; W_v]ᵀ + [b_uq; 0; 0])      ONE GEMM and one SiLU    (b, C, 2·d_a + w_k + w_v)
    u, q, k_user, v_user = the column ranges of z       views, no copies
    idx = argmax_m h · R_m                              per distinct router (a joint router routes once)

Each router is routed on a stream of its own beside the GEMM (:func:`cachestore.decode.capture.beside`: branches of a
CUDA graph); on CUDA by :func:`cachestore.decode.fused_route.route_rows` (tensor-core scan, fp32
argmax), elsewhere (or routers wider than it takes) by ``model.routing.route`` of the logits, which it equals. The
candidate's K/V rows themselves (user part ⊕ pool row) are never built: the history kernel adds the candidate's
attention to itself from :class:`SelfKV`. No host syncs (the int8 scale was checked when the resident read it:
``model.entry.user_scales``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from collectivekv.cachestore.decode.capture import beside
from collectivekv.cachestore.decode.decode import ResidentZooModel
from collectivekv.cachestore.decode.fused_route import MAX_WIDTH, route_rows, router_bound
from collectivekv.model.pool import KVBranch
from collectivekv.model.quant import fake_quant
from collectivekv.model.routing import route


class SelfKV(NamedTuple):
    """The candidates' own K and V as the history kernel reads them: user parts (b·C, W) with unit column stride and
    any row stride (:func:`as_rows`; W: the branch's user width, 0 for a V of pool rows alone) and router indices
    (b·C,) int64 (None: the side is not shared, its user part is the whole row)."""

    k_user: torch.Tensor
    k_idx: torch.Tensor | None
    v_user: torch.Tensor
    v_idx: torch.Tensor | None


class Projection(NamedTuple):
    """One layer's candidate projections as one GEMM: weight (2·d_a + w_k + w_v, E), bias (same rows), and the K / V
    user widths w_k, w_v (0 where a branch has no projection)."""

    weight: torch.Tensor
    bias: torch.Tensor
    k_width: int
    v_width: int


def _width(branch: KVBranch) -> int:
    return 0 if branch.proj is None else branch.proj.out_features


def projections(resident: ResidentZooModel) -> list[Projection]:
    """Per layer the concatenated [W_uq; W_k; W_v] and bias (module docstring), built once and cached on the resident
    (build them before capturing a CUDA graph: the first call allocates)."""
    cache = resident.__dict__.get("_fused_hstu_projections")
    if cache is None:
        cache = []
        with torch.no_grad():
            for layer in resident.model.layers:
                weights = [layer.uq.weight] + [b.proj.weight for b in (layer.k_branch, layer.v_branch)
                                               if b.proj is not None]  # fmt: skip
                weight = torch.cat(weights).detach().contiguous()  # (2·d_a + w_k + w_v, E)
                bias = weight.new_zeros(weight.shape[0])
                if layer.uq.bias is not None:
                    bias[: layer.uq.out_features] = layer.uq.bias.detach()
                cache.append(Projection(weight, bias, _width(layer.k_branch), _width(layer.v_branch)))
        resident.__dict__["_fused_hstu_projections"] = cache
    return cache


class LayerRouters(NamedTuple):
    """One layer's distinct routers as (weight (M, E), :func:`cachestore.decode.fused_route.router_bound`), each routed
    once (a joint router serves both sides), and per side (K, V) the position of its router there (None: the side takes
    no pool row)."""

    routers: list[tuple[torch.Tensor, torch.Tensor]]
    k: int | None
    v: int | None


def layer_routers(resident: ResidentZooModel) -> list[LayerRouters]:
    """Per layer its :class:`LayerRouters`, built once and cached on the resident like :func:`projections`."""
    cache = resident.__dict__.get("_fused_hstu_routers")
    if cache is None:
        cache = []
        for layer in resident.model.layers:
            routers: list[tuple[torch.Tensor, torch.Tensor]] = []
            at: list[int | None] = []
            for branch in (layer.k_branch, layer.v_branch):
                weight = branch.routing_weight() if branch.shared and branch.collective_pool() is not None else None
                found = None if weight is None else next((i for i, (w, _) in enumerate(routers) if w is weight), None)
                if weight is not None and found is None:
                    routers.append((weight, router_bound(weight)))
                    found = len(routers) - 1
                at.append(found)
            cache.append(LayerRouters(routers, at[0], at[1]))
        resident.__dict__["_fused_hstu_routers"] = cache
    return cache


def _route(h: torch.Tensor, weight: torch.Tensor, bound: torch.Tensor | None) -> torch.Tensor:
    """(b·C,) int64 argmax of h (b, C, E) against the router ``weight`` (module docstring)."""
    rows = h.reshape(-1, h.shape[-1])  # (b·C, E)
    if h.is_cuda and h.shape[-1] <= MAX_WIDTH:
        return route_rows(rows, weight, bound)
    return route(nn.functional.linear(rows, weight)).idx


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(b, C, W) → (b·C, W) with unit column stride and one row stride (a view where the layout allows, as for the
    column ranges of the projection's output)."""
    b, c, w = t.shape
    if t.stride(-1) == 1 and t.stride(0) == c * t.stride(1):
        return t.as_strided((b * c, w), (t.stride(1), 1))
    return t.reshape(b * c, w).contiguous()


def candidate_layer(resident: ResidentZooModel, i: int, h: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, SelfKV]:
    """u, q (b, C, d_a) and the candidates' :class:`SelfKV` of layer ``i`` from h = LayerNorm(x) (b, C, E) (module
    docstring). Shape-static, no host syncs; the routers' streams join before it returns."""
    layer = resident.model.layers[i]
    d_a = resident.cfg.d_attn
    plan = layer_routers(resident)[i]
    picked, joins = [], []
    for lane, (weight, bound) in enumerate(plan.routers):  # each router on a stream of its own (CPU: in order)
        main, side = beside(h.device, lane)
        with torch.cuda.stream(side):  # no-op for side None
            picked.append(_route(h, weight, bound))
        if side is not None:
            joins.append((main, side))
    proj = projections(resident)[i]
    z = nn.functional.silu(nn.functional.linear(h, proj.weight, proj.bias))  # (b, C, 2·d_a + w_k + w_v)
    u, q = z[..., :d_a], z[..., d_a : 2 * d_a]
    k_user = z[..., 2 * d_a : 2 * d_a + proj.k_width]
    v_user = z[..., 2 * d_a + proj.k_width :]
    if layer.k_branch.int8:
        k_user = fake_quant(k_user, layer.k_branch.user_scale).to(z.dtype)
    if layer.v_branch.int8:
        v_user = fake_quant(v_user, layer.v_branch.user_scale).to(z.dtype)
    for main, side in joins:
        main.wait_stream(side)  # join: the history kernel reads the indices
    k_idx, v_idx = (None if at is None else picked[at] for at in (plan.k, plan.v))
    return u, q, SelfKV(as_rows(k_user), k_idx, as_rows(v_user), v_idx)
