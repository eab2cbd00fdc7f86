"""HSTU decode straight from the packed batch bytes: one Triton kernel per layer for the cached history.

:meth:`model.hstu.HSTU.decode` runs every candidate (position n_b of user b) through every layer; per
layer h = LayerNorm(x), u, q = SiLU(W_uq h), the candidate's own K/V from the layer's branches, and per
head ``A_j = SiLU(q·k_j/√dh + rel_bias[h, bucket(n - j)]) / max_len`` over the cached positions j < n and
the candidate itself (distance 0); ``x ← x + W_o(LayerNorm(Σ_j A_j v_j) ⊙ u)``; an MLP on
``[LayerNorm(x), t]`` scores it. The eager serving path unpacks every layer's parts into padded tensors
and rebuilds K/V per user. :func:`hstu_static_decode` computes the same logits with the per-candidate
work (projections, the self term, the MLP) in torch and the cached-history term by ONE kernel per layer
that reads the packed batch (:mod:`cachestore.decode.batch`) in place:

    program (b·C + c, g, s) — user b, candidate c, heads g·GH .. g·GH + GH - 1, behaviours of part s (of S)
      n = min(lengths[b], max_len); starts[p, b]: byte start of part p of user b's record (header skipped;
        part p holds min(n, cap_p) rows, every HSTU part has cap max_len: cachestore.store.entry.EntryLayout)
      for blocks of BLOCK_L behaviours j < n (fp32 accumulation):
          k_j  = k_user[j, cols] (0 beyond dk) + P_k[k_idx[j], cols]    (pool rows zero in the user dims;
                 a joint index: kv_idx[j] picks the K and the V row, read once; int8 parts: code × scale)
          a_jh = SiLU(q[b, c, head h]·k_j,h / √dh + bias[h, n - j])      bias[h, d] = rel_bias[h, bucket(d)]
          v_j  = v_user[j, cols] (0 beyond dv) + P_v[v_idx[j], cols]
      out[s, b·C + c, cols] = Σ_j a_jh v_j,h / max_len                   (zeros when n == 0)

and the parts s are summed in torch (no softmax: the history term is a plain sum). K/V rows are rebuilt
in registers, never written to memory. A router index outside 0 .. pool_size - 1 is never read (its
pool loads are masked) and sets ``flags[b] = 1``. Full-KV stores (``mode`` "full") hold the whole d_a
row as the user part and no indices. fp32 user parts that the layout can place at a 2-byte boundary
(one side shared or a joint index, uint16 indices) are read as 16-bit halves.

Pool rows are read at the store's precision unless ``FusedConfig.pool_dtype`` says otherwise (as in
:mod:`cachestore.decode.fused`); per layer the padded pools and the distance → bias table are cached on the
resident model. ``tests/cachestore/decode/test_fused_hstu.py`` checks the logits against the model's training forward
and the eager serving path, on CUDA and under Triton's interpreter on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from collectivekv.cachestore.decode.decode import ResidentZooModel
from collectivekv.cachestore.decode.fused import IDX_BYTES, INTERPRETED, _gather_rows, _load_idx, _load_side, tl, triton
from collectivekv.cachestore.decode.fused_config import DEFAULT_FUSED, FusedConfig, pool_dtype, split_parts
from collectivekv.cachestore.decode.fused_mlp import mlp_logits
from collectivekv.cachestore.decode.fused_route import MAX_WIDTH, route_rows, router_bound
from collectivekv.cachestore.decode.fused_view import (
    check_half_layout,
    group_scales,
    record_part_starts,
    side_codes,
    user_halves,
)
from collectivekv.cachestore.decode.transfer import KV_TORCH
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.record import RouterIndexError
from collectivekv.model.cache_spec import entry_parts, store_config
from collectivekv.model.hstu import HSTULayer, rel_bucket
from collectivekv.model.pool import KVBranch
from collectivekv.model.quant import fake_quant
from collectivekv.model.routing import route

if triton is not None:

    @triton.jit
    def _rows(raw_ptr, pool_ptr, user_base, idx, ls, cols, lmask, nbad, pool_size, scale, D_A: tl.constexpr,
              WIDTH: tl.constexpr, SHARED: tl.constexpr, CODE: tl.constexpr):
        """K (or V) rows (BLOCK_L, GH·DH) fp32 = user part (stored as CODE: a float dtype, fp32 read as 16-bit
        halves, or int8 codes × ``scale``) ⊕ pool row ``idx`` (SHARED), and the count of bad indices."""
        rows = _load_side(raw_ptr, user_base, ls, cols, lmask, WIDTH, CODE, scale)
        if SHARED:
            pool, nbad = _gather_rows(pool_ptr, idx, cols, lmask, nbad, pool_size, D_A)
            rows += pool
        return rows, nbad

    @triton.jit
    def _history_block(raw_ptr, bias_ptr, pool_k_ptr, pool_v_ptr, ku, vu, ki, vi, n, stop, l0, q, cols, heads, acc,
                       nbad, pool_size, k_scale, v_scale, D_A: tl.constexpr, GH: tl.constexpr, DH: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr, K_SHARED: tl.constexpr, V_SHARED: tl.constexpr,
                       K_CODE: tl.constexpr, V_CODE: tl.constexpr, JOINT: tl.constexpr, IDX_BYTES: tl.constexpr,
                       BLOCK_L: tl.constexpr, MAX_N: tl.constexpr):
        """acc (GH, DH) += Σ_j SiLU(score_jh) v_jh over behaviours j = l0 .. l0 + BLOCK_L - 1 (masked at j >= stop);
        JOINT: the one index part (at ki) picks both pool rows, read once."""
        ls = l0 + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
        lmask = ls < stop
        ik = ls * 0
        if K_SHARED:
            ik = _load_idx(raw_ptr, ki, ls, lmask, IDX_BYTES)
        key, nbad = _rows(raw_ptr, pool_k_ptr, ku, ik, ls, cols, lmask, nbad, pool_size, k_scale, D_A, DK, K_SHARED,
                          K_CODE)  # (BLOCK_L, GH·DH)
        s = tl.sum(tl.reshape(key * q[None, :], (BLOCK_L, GH, DH)), axis=2)  # (BLOCK_L, GH)
        dist = tl.minimum(tl.maximum(n - ls, 0), MAX_N)  # (BLOCK_L,) n - j in 1 .. n where unmasked
        s += tl.load(bias_ptr + heads[None, :] * (MAX_N + 1) + dist[:, None], mask=lmask[:, None], other=0.0)
        a = tl.where(lmask[:, None], s / (1.0 + tl.exp(-s)), 0.0)  # (BLOCK_L, GH) SiLU, 0 at masked rows
        iv = ik
        if V_SHARED and not JOINT:
            iv = _load_idx(raw_ptr, vi, ls, lmask, IDX_BYTES)
        val, nbad = _rows(raw_ptr, pool_v_ptr, vu, iv, ls, cols, lmask, nbad, pool_size, v_scale, D_A, DV, V_SHARED,
                          V_CODE)  # (BLOCK_L, GH·DH)
        acc += tl.sum(a[:, :, None] * tl.reshape(val, (BLOCK_L, GH, DH)), axis=0)  # (GH, DH)
        return acc, nbad

    @triton.jit
    def _hstu_history_kernel(
        raw_ptr, header_ptr, starts_ptr, q_ptr, bias_ptr, pool_k_ptr, pool_v_ptr, out_ptr, flag_ptr, n_users, n_cand,
        scale, inv_norm, pool_size, k_scale, v_scale, D_A: tl.constexpr, GH: tl.constexpr, DH: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, K_CODE: tl.constexpr,
        V_CODE: tl.constexpr, JOINT: tl.constexpr, IDX_BYTES: tl.constexpr, P_KU: tl.constexpr,
        P_VU: tl.constexpr, P_KI: tl.constexpr, P_VI: tl.constexpr, BLOCK_L: tl.constexpr, MAX_N: tl.constexpr,
        LOOP_N: tl.constexpr, SEG: tl.constexpr,
    ):
        row = tl.program_id(0)  # b·C + c: rows of q
        group = tl.program_id(1)  # heads group·GH .. group·GH + GH - 1
        part = tl.program_id(2)  # behaviours part·SEG .. part·SEG + SEG - 1
        b = row // n_cand
        n = tl.minimum(tl.load(header_ptr + n_users + b), MAX_N)  # behaviours of user b
        ku = tl.load(starts_ptr + P_KU * n_users + b)  # byte starts of this layer's parts in user b's record
        vu = tl.load(starts_ptr + P_VU * n_users + b)
        ki = tl.load(starts_ptr + P_KI * n_users + b)
        vi = tl.load(starts_ptr + P_VI * n_users + b)
        lo = part * SEG
        stop = tl.minimum(n, lo + SEG)
        cols = group * GH * DH + tl.arange(0, GH * DH)  # (GH·DH,) this group's columns of d_a
        heads = group * GH + tl.arange(0, GH)  # (GH,)
        q = tl.load(q_ptr + row * D_A + cols).to(tl.float32) * scale  # (GH·DH,)
        acc = tl.zeros([GH, DH], dtype=tl.float32)
        nbad = tl.zeros([], dtype=tl.int32)
        if LOOP_N > 0:  # Triton's CPU interpreter cannot loop to a loaded bound: static bound, masked
            for l0 in range(0, LOOP_N, BLOCK_L):
                acc, nbad = _history_block(
                    raw_ptr, bias_ptr, pool_k_ptr, pool_v_ptr, ku, vu, ki, vi, n, stop, lo + l0, q, cols, heads, acc,
                    nbad, pool_size, k_scale, v_scale, D_A, GH, DH, DK, DV, K_SHARED, V_SHARED, K_CODE, V_CODE, JOINT,
                    IDX_BYTES, BLOCK_L, MAX_N)
        else:
            for l0 in range(lo, stop, BLOCK_L):
                acc, nbad = _history_block(
                    raw_ptr, bias_ptr, pool_k_ptr, pool_v_ptr, ku, vu, ki, vi, n, stop, l0, q, cols, heads, acc,
                    nbad, pool_size, k_scale, v_scale, D_A, GH, DH, DK, DV, K_SHARED, V_SHARED, K_CODE, V_CODE, JOINT,
                    IDX_BYTES, BLOCK_L, MAX_N)
        tl.store(flag_ptr + b, 1, mask=nbad > 0)
        rows = tl.num_programs(0)
        tl.store(out_ptr + (part * rows + row) * D_A + cols, tl.reshape(acc * inv_norm, (GH * DH,)))


def _padded_pool(branch: KVBranch, d_a: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The branch's pool (its own, or its columns of a joint pool) as (pool, d_a) rows zero in the user dims, at
    ``dtype``; 1 zero row when unshared."""
    pool = branch.collective_pool()
    if pool is None:
        return torch.zeros(1, d_a, dtype=dtype, device=device)
    pool = pool.detach()  # (M, d_a - d_u)
    return torch.cat([pool.new_zeros(pool.shape[0], d_a - pool.shape[1]), pool], 1).to(dtype).contiguous()


Tables = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per layer: (P_k, P_v, bias)


def layer_tables(resident: ResidentZooModel, dtype: torch.dtype) -> Tables:
    """Per layer (P_k, P_v, bias): padded pools (pool, d_a) at ``dtype`` and bias (H, max_len + 1) fp32 with
    ``bias[h, d] = rel_bias[h, rel_bucket(d)]``. Built once per dtype and cached on the resident (build
    them before capturing a CUDA graph: the first call allocates)."""
    cache: dict = resident.__dict__.setdefault("_fused_hstu_tables", {})
    if dtype not in cache:
        d_a, dev = resident.cfg.d_attn, resident.device
        dist = torch.arange(resident.cfg.max_len + 1, device=dev)  # (max_len + 1,)
        with torch.no_grad():
            cache[dtype] = [(_padded_pool(layer.k_branch, d_a, dtype, dev),
                             _padded_pool(layer.v_branch, d_a, dtype, dev),
                             layer.rel_bias.detach()[:, rel_bucket(dist)].float().contiguous())  # (H, max_len + 1)
                            for layer in resident.model.layers]  # fmt: skip
    return cache[dtype]


def part_starts(raw: torch.Tensor, layout: EntryLayout, n_users: int) -> torch.Tensor:
    """(P, B) int64: byte start in ``raw`` of part p of user b
    (:func:`cachestore.decode.fused_view.record_part_starts`)."""
    return record_part_starts(raw, layout, n_users)[:-1]


def hstu_history(raw: torch.Tensor, q: torch.Tensor, starts: torch.Tensor, layer: int, *,
                 resident: ResidentZooModel, layout: EntryLayout, n_users: int, flags: torch.Tensor,
                 config: FusedConfig = DEFAULT_FUSED) -> torch.Tensor:
    """Layer ``layer``'s cached-history term (b, C, d_a) fp32 of ``q`` (b, C, d_a) for users 0 .. b - 1 of the
    packed batch ``raw`` (starts: :func:`part_starts`): the module docstring's kernel. ``flags`` (n_users,)
    int32: set to 1 for a user with a router index outside the pool. No host syncs."""
    cfg = resident.cfg
    b, c, d_a = q.shape
    heads = cfg.n_heads
    dh, gh = d_a // heads, config.heads_per_program
    pool_k, pool_v, bias = layer_tables(resident, KV_TORCH[pool_dtype(config, layout)])[layer]
    g = next(g for g in layout.groups if g.name == f"layer{layer}")
    where = {p.name: i for i, p in enumerate(layout.parts)}
    ku, vu = where[f"{g.name}.k_user"], where[f"{g.name}.v_user"]  # every HSTU layer caches K and V
    ki, vi = (where.get(g.idx_part(side) or "") for side in "kv")  # one kv_idx for both when joint
    k_code, v_code, _, _ = side_codes(g, layout.kv_dtype, user_halves(layout, g))
    k_scale, v_scale = group_scales(resident, g)
    rows, groups, max_n = b * c, heads // gh, layout.max_len
    parts = split_parts(config, rows, groups, max(1, max_n), q.device)
    seg = -(-max(1, max_n) // (parts * config.block_l)) * config.block_l  # behaviours per part, whole blocks
    out = torch.empty(parts, rows, d_a, dtype=torch.float32, device=q.device)  # (S, b·C, d_a)
    if rows == 0:
        return out.sum(0).view(b, c, d_a)
    stages = {} if config.num_stages is None else {"num_stages": config.num_stages}
    _hstu_history_kernel[(rows, groups, parts)](
        raw, raw[: 16 * n_users].view(torch.int64), starts, q.float().contiguous(), bias, pool_k, pool_v, out,
        flags, n_users, c, 1.0 / math.sqrt(dh), 1.0 / float(cfg.max_len), cfg.collective.pool_size, float(k_scale),
        float(v_scale), D_A=d_a, GH=gh, DH=dh, DK=layout.parts[ku].width, DV=layout.parts[vu].width,
        K_SHARED=ki is not None, V_SHARED=vi is not None, K_CODE=k_code, V_CODE=v_code, JOINT=g.joint,
        IDX_BYTES=IDX_BYTES[layout.idx_dtype],
        P_KU=ku, P_VU=vu, P_KI=ki or 0, P_VI=vi or 0, BLOCK_L=config.block_l, MAX_N=max_n,
        LOOP_N=seg if INTERPRETED else 0, SEG=seg, num_warps=config.num_warps, **stages,
    )
    return out.sum(0).view(b, c, d_a)  # (b, C, d_a)


def router_bounds(resident: ResidentZooModel) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per layer the (K, V) routers' :func:`cachestore.decode.fused_route.router_bound` (None where a side is not
    routed), built once and cached on the resident like :func:`layer_tables`."""
    cache = resident.__dict__.get("_fused_hstu_router_bounds")
    if cache is None:
        def bound(branch: KVBranch) -> torch.Tensor | None:
            weight = branch.routing_weight() if branch.shared else None
            return None if weight is None else router_bound(weight)

        cache = [(bound(layer.k_branch), bound(layer.v_branch)) for layer in resident.model.layers]
        resident.__dict__["_fused_hstu_router_bounds"] = cache
    return cache


def _candidate_side(branch: KVBranch, h: torch.Tensor, bound: torch.Tensor | None,
                    routed: dict[int, torch.Tensor]) -> torch.Tensor:
    """The candidates' own K (or V) (B, C, d_a) from h (B, C, E): SiLU(W h) ⊕ pool[argmax router(h)]
    (shared; as ``HSTULayer.project`` with hard routing: the branch's own router and pool, or its joint router
    and pool columns; int8 branches fake-quantise the user part with their scale) or SiLU(W h) (not shared).
    The argmax is :func:`cachestore.decode.fused_route.route_rows` on CUDA (bound: the router's,
    :func:`router_bounds`; elsewhere ``model.routing.route`` of the logits, which it equals), kept in ``routed`` by
    router so that a joint router routes once. No host sync (the scale was checked when
    the resident read it: ``model.entry.user_scales``)."""
    user = nn.functional.silu(branch.proj(h))  # (B, C, d_u or d_a)
    pool, weight = branch.collective_pool(), branch.routing_weight()
    if not branch.shared or pool is None or weight is None:
        return user
    if branch.int8:
        user = fake_quant(user, branch.user_scale).to(user.dtype)
    if id(weight) not in routed:  # off CUDA (Triton's interpreter) or wider than it takes: the logits' argmax in torch
        routed[id(weight)] = (route_rows(h.reshape(-1, h.shape[-1]), weight, bound).view(h.shape[:-1])
                              if h.is_cuda and h.shape[-1] <= MAX_WIDTH
                              else route(nn.functional.linear(h, weight)).idx)  # (B, C)
    idx = routed[id(weight)]
    rows = pool.index_select(0, idx.reshape(-1)).reshape(*idx.shape, -1)  # (B, C, d_a - d_u)
    return torch.cat([user, rows.to(user.dtype)], dim=-1)


def _self_term(layer: HSTULayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each candidate's attention to itself (distance 0): SiLU(q·k/√dh + rel_bias[h, 0]) / max_len · v, (B, C, d_a)."""
    b, c, d_a = q.shape
    heads = layer.n_heads
    dh = d_a // heads
    qh, kh, vh = (t.reshape(b, c, heads, dh) for t in (q, k, v))  # (B, C, H, dh)
    scores = (qh * kh).sum(-1) / math.sqrt(dh) + layer.rel_bias[:, 0]  # (B, C, H)
    weights = nn.functional.silu(scores) / layer.norm_len
    return (weights.unsqueeze(-1) * vh).reshape(b, c, d_a)


def check_hstu_batch(raw: torch.Tensor, candidates: torch.Tensor, resident: ResidentZooModel, layout: EntryLayout,
                     n_users: int, config: FusedConfig) -> None:
    """ValueError (RuntimeError without Triton) where :func:`hstu_static_decode` cannot serve this batch."""
    if triton is None:
        raise RuntimeError("the fused HSTU decode needs Triton (pip install triton), or use the eager path")
    cfg = resident.cfg
    if not isinstance(layout, EntryLayout) or layout.arch != "hstu" or cfg.arch != "hstu":
        raise ValueError("the fused HSTU decode reads HSTU stores with an HSTU model")
    check_half_layout(layout, "the fused HSTU decode")
    if layout.parts != entry_parts(store_config(cfg, layout.mode)) or layout.max_len != cfg.max_len:
        raise ValueError(f"the store's parts are not those of the model's {layout.mode} cache")
    device = next(resident.model.parameters()).device  # concrete (cuda:0 where the resident says cuda)
    if raw.dtype != torch.uint8 or raw.device != device or candidates.device != device:
        raise ValueError(f"the packed batch (uint8) and the candidates must be on the model's device {device}")
    if candidates.dim() != 2 or candidates.shape[0] > n_users:
        raise ValueError(f"candidates {tuple(candidates.shape)}: want (b, C) with b <= {n_users} users")
    dh = cfg.d_attn // cfg.n_heads
    if dh & (dh - 1) or cfg.n_heads % config.heads_per_program:
        raise ValueError(f"the fused kernel needs a power-of-two head dim ({dh}) and heads_per_program dividing "
                         f"{cfg.n_heads} ({config.heads_per_program})")


def hstu_static_decode(raw: torch.Tensor, candidates: torch.Tensor, *, resident: ResidentZooModel,
                       layout: EntryLayout, n_users: int, config: FusedConfig = DEFAULT_FUSED,
                       flags: torch.Tensor | None = None, on_chunk: Callable[[int], None] | None = None
                       ) -> torch.Tensor:
    """Logits (b, C) of ``candidates`` (b, C) int64 of users 0 .. b - 1 (b <= n_users) against the packed batch
    ``raw`` (uint8 on the resident's device, :mod:`cachestore.decode.batch`) of an HSTU store: ``HSTU.decode`` with
    every layer's cached-history term from :func:`hstu_history` (launched with ``config``; pool rows at
    ``config.pool_dtype``, the store's precision by default). Shape-static and free of host syncs with
    ``flags`` ((n_users,) int32, set to 1 for a user with a router index outside the pool; the caller raises
    after the batch): CUDA-graph capturable once :func:`layer_tables` has run. Without ``flags``: a
    ``RouterIndexError`` naming the batch row, after a host sync. ``on_chunk``: called with 0 after the first
    layer's candidate work (its projections and routing, which read no batch byte) and before the first read of
    ``raw``, and with 1 after the last (a CUDA graph copies the batch meanwhile). Call under ``inference_mode`` /
    ``no_grad``."""
    check_hstu_batch(raw, candidates, resident, layout, n_users, config)
    model = resident.model
    flag = torch.zeros(n_users, dtype=torch.int32, device=raw.device) if flags is None else flags
    bounds = router_bounds(resident)
    t = model.item_embedding(candidates)  # (b, C, E)
    x = t
    starts = None
    for i, layer in enumerate(model.layers):
        h = layer.norm_in(x)
        u, q = nn.functional.silu(layer.uq(h)).chunk(2, dim=-1)  # (b, C, d_a) each
        routed: dict[int, torch.Tensor] = {}
        k = _candidate_side(layer.k_branch, h, bounds[i][0], routed)
        v = _candidate_side(layer.v_branch, h, bounds[i][1], routed)
        if starts is None:  # the batch is read from here on
            if on_chunk is not None:
                on_chunk(0)
            starts = part_starts(raw, layout, n_users)  # (P, B)
        history = hstu_history(raw, q, starts, i, resident=resident, layout=layout, n_users=n_users, flags=flag,
                               config=config)
        x = layer.update(x, history.to(q.dtype) + _self_term(layer, q, k, v), u)
    if on_chunk is not None:
        on_chunk(1)
    logits = model.score_hidden(x, t, head=mlp_logits)  # (b, C)
    if flags is None and bool(flag.any()):
        raise RouterIndexError(f"a router index outside the pool 0..{resident.cfg.collective.pool_size - 1} in "
                               f"batch row {int(torch.nonzero(flag)[0, 0])}: the record is corrupt "
                               "(run `ckv store verify STORE`)")
    return logits
