"""HSTU decode straight from the packed batch bytes: one Triton kernel per layer for the candidate's attention.

:meth:`model.hstu.HSTU.decode` runs every candidate (position n_b of user b) through every layer; per
layer h = LayerNorm(x), u, q = SiLU(W_uq h), the candidate's own K/V from the layer's branches, and per
head ``A_j = SiLU(q·k_j/√dh + rel_bias[h, bucket(n - j)]) / max_len`` over the cached positions j < n and
the candidate itself (distance 0); ``x ← x + W_o(LayerNorm(Σ_j A_j v_j) ⊙ u)``; an MLP on
``[LayerNorm(x), t]`` scores it. The eager serving path unpacks every layer's parts into padded tensors
and rebuilds K/V per user. :func:`hstu_static_decode` computes the same logits with the candidates' own work
(:mod:`cachestore.decode.fused_hstu_candidate`: one GEMM for u, q and their K/V user parts, the routing beside it),
W_o and the MLP in torch, and the attention by ONE kernel per layer that reads the packed batch
(:mod:`cachestore.decode.batch`) in place:

    program (b·C + c, g, s) — user b, candidate c, heads g·GH .. g·GH + GH - 1, behaviours of part s (of S)
      n = min(lengths[b], max_len); part p of user b's record starts at offsets[b] + 32 + n·offset_p (every HSTU
        part holds n rows: :func:`part_offsets`), the record ends at offsets[b] + 32 + n·(bytes per behaviour);
        a launch serves only the users whose records end in its byte range (end_lo, end_hi]
      for blocks of BLOCK_L behaviours j < n (fp32 accumulation):
          k_j  = k_user[j, cols] (0 beyond dk) + P_k[k_idx[j], cols]    (pool rows zero in the user dims;
                 a joint index: kv_idx[j] picks the K and the V row, read once; int8 parts: code × scale)
          a_jh = SiLU(q[b, c, head h]·k_j,h / √dh + bias[h, n - j])      bias[h, d] = rel_bias[h, bucket(d)]
          v_j  = v_user[j, cols] (0 beyond dv) + P_v[v_idx[j], cols]
      s == 0: + SiLU(q·k_self,h / √dh + bias[h, 0]) v_self,h             the candidate's own row: its user part ⊕
                                                                          its pool row (fp32), from SelfKV
      out[s, b·C + c, cols] = Σ_j a_jh v_j,h / max_len                   (zeros when n == 0)

and the parts s are summed by the launch that normalises and gates the layer's output (no softmax: the attention is
a plain sum; :func:`cachestore.decode.fused_norm.norm_gate`). K/V rows are rebuilt
in registers, never written to memory. A router index outside 0 .. pool_size - 1 is never read (its
pool loads are masked) and sets ``flags[b] = 1``. Full-KV stores (``mode`` "full") hold the whole d_a
row as the user part and no indices. fp32 user parts that the layout can place at a 2-byte boundary
(one side shared or a joint index, uint16 indices) are read as 16-bit halves.

The first layer's launches can follow a batch copied in pieces (``chunks``, as din's
:func:`cachestore.decode.fused.fused_attention`): :class:`cachestore.decode.graphs.GraphedDecoder` launches it once
per piece, right after that piece lands, so most of it runs beside the copy; the later layers wait for the whole
batch — with a batch split by layer (:mod:`cachestore.decode.layer_batch`, ``rest``) only for its second buffer, which
crosses PCIe while the first layer runs. History pool rows are read at the store's precision unless
``FusedConfig.pool_dtype`` says otherwise (as in :mod:`cachestore.decode.fused`); per layer the padded pools and the
distance → bias table are cached on the resident model. ``tests/cachestore/decode/test_fused_hstu.py`` checks the
logits against the model's training forward and the eager serving path, on CUDA and under Triton's interpreter on CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from collectivekv.cachestore.decode.decode import ResidentZooModel
from collectivekv.cachestore.decode.fused import (
    IDX_BYTES,
    INTERPRETED,
    _gather_rows,
    _load_idx,
    _load_side,
    tl,
    triton,
)
from collectivekv.cachestore.decode.fused_config import (
    ALL_BYTES,
    DEFAULT_FUSED,
    FusedConfig,
    check_chunks,
    launch_shape,
    pool_dtype,
)
from collectivekv.cachestore.decode.fused_hstu_candidate import SelfKV, as_rows, candidate_layer
from collectivekv.cachestore.decode.fused_mlp import mlp_logits
from collectivekv.cachestore.decode.fused_norm import norm_gate
from collectivekv.cachestore.decode.fused_view import check_half_layout, group_scales, side_codes, user_halves
from collectivekv.cachestore.decode.layer_batch import header_bytes, split_layouts
from collectivekv.cachestore.decode.transfer import KV_TORCH
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.record import HEADER_SIZE, RouterIndexError
from collectivekv.model.cache_spec import entry_parts, store_config
from collectivekv.model.hstu import rel_bucket
from collectivekv.model.pool import KVBranch

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
    def _self_row(user_ptr, user_stride, idx_ptr, pool_ptr, row, cols, pool_size, D_A: tl.constexpr,
                  WIDTH: tl.constexpr, SHARED: tl.constexpr):
        """The candidate's own K (or V) row at ``cols`` fp32: its user part (WIDTH columns at ``user_ptr``, row
        stride ``user_stride``) ⊕ (SHARED) the pool row of its router index (an index outside the pool reads 0)."""
        out = tl.load(user_ptr + row * user_stride + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
        if SHARED:
            i = tl.load(idx_ptr + row)
            inside = (i >= 0) & (i < pool_size)
            out += tl.load(pool_ptr + i * D_A + cols, mask=(cols < D_A) & inside, other=0.0).to(tl.float32)
        return out

    @triton.jit
    def _hstu_history_kernel(
        raw_ptr, header_ptr, q_ptr, q_stride, bias_ptr, pool_k_ptr, pool_v_ptr, out_ptr, flag_ptr, sku_ptr, sku_stride,
        svu_ptr, svu_stride, ski_ptr, svi_ptr, self_k_ptr, self_v_ptr, n_users, n_cand, scale, inv_norm, pool_size,
        k_scale, v_scale, end_lo, end_hi, D_A: tl.constexpr, GH: tl.constexpr, DH: tl.constexpr, DK: tl.constexpr,
        DV: tl.constexpr, K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, K_CODE: tl.constexpr, V_CODE: tl.constexpr,
        JOINT: tl.constexpr, IDX_BYTES: tl.constexpr, HEADER: tl.constexpr, OFF_KU: tl.constexpr, OFF_VU: tl.constexpr,
        OFF_KI: tl.constexpr, OFF_VI: tl.constexpr, REC: tl.constexpr, SELF: tl.constexpr, SKW: tl.constexpr,
        SVW: tl.constexpr, SK_SHARED: tl.constexpr, SV_SHARED: tl.constexpr, BLOCK_L: tl.constexpr,
        MAX_N: tl.constexpr, LOOP_N: tl.constexpr, SEG: tl.constexpr,
    ):
        row = tl.program_id(0)  # b·C + c: rows of q
        group = tl.program_id(1)  # heads group·GH .. group·GH + GH - 1
        part = tl.program_id(2)  # behaviours part·SEG .. part·SEG + SEG - 1
        b = row // n_cand
        n = tl.maximum(tl.minimum(tl.load(header_ptr + n_users + b), MAX_N), 0)  # behaviours of user b
        base = tl.load(header_ptr + b) + HEADER  # the record's first part (after its header)
        # every part holds n rows (cap max_len): part p starts n · (row bytes of the parts before it) in
        ku = base + n * OFF_KU
        vu = base + n * OFF_VU
        ki = base + n * OFF_KI
        vi = base + n * OFF_VI
        end = base + n * REC  # one past the record
        mine = (end > end_lo) & (end <= end_hi)  # this launch serves the users whose records end in its range
        lo = part * SEG
        stop = tl.where(mine, tl.minimum(n, lo + SEG), lo)  # no behaviours for another launch's users
        cols = group * GH * DH + tl.arange(0, GH * DH)  # (GH·DH,) this group's columns of d_a
        heads = group * GH + tl.arange(0, GH)  # (GH,)
        q = tl.load(q_ptr + row * q_stride + cols).to(tl.float32) * scale  # (GH·DH,)
        acc = tl.zeros([GH, DH], dtype=tl.float32)
        if SELF:  # part 0 starts from the candidate's attention to itself (distance 0); before the loop, so that
            # the self row's registers are free during it
            key = _self_row(sku_ptr, sku_stride, ski_ptr, self_k_ptr, row, cols, pool_size, D_A, SKW, SK_SHARED)
            val = _self_row(svu_ptr, svu_stride, svi_ptr, self_v_ptr, row, cols, pool_size, D_A, SVW, SV_SHARED)
            s = tl.sum(tl.reshape(key * q, (GH, DH)), axis=1) + tl.load(bias_ptr + heads * (MAX_N + 1))  # (GH,)
            a = tl.where(part == 0, s / (1.0 + tl.exp(-s)), 0.0)  # (GH,) SiLU
            acc = a[:, None] * tl.reshape(val, (GH, DH))
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
        tl.store(flag_ptr + b, 1, mask=mine & (nbad > 0))
        rows = tl.num_programs(0)
        tl.store(out_ptr + (part * rows + row) * D_A + cols, tl.reshape(acc * inv_norm, (GH * DH,)), mask=mine)


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


@functools.cache  # per layout: read on every request
def part_offsets(layout: EntryLayout) -> tuple[dict[str, int], int]:
    """Every part's byte offset in an HSTU record per behaviour (part p of a user with n behaviours starts
    ``offsets[b] + 32 + n · offset_p``: every HSTU part holds min(n, max_len) rows) and the bytes of one behaviour
    over all parts (the record ends n · that past its 32-byte header)."""
    at, offsets = 0, {}
    for part, row in zip(layout.parts, layout.row_bytes, strict=True):
        offsets[part.name] = at
        at += row
    return offsets, at


def hstu_history(raw: torch.Tensor, q: torch.Tensor, layer: int, *, resident: ResidentZooModel,
                 layout: EntryLayout, n_users: int, flags: torch.Tensor, config: FusedConfig = DEFAULT_FUSED,
                 own: SelfKV | None = None, chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                 on_chunk: Callable[[int], None] | None = None, header: torch.Tensor | None = None) -> torch.Tensor:
    """Layer ``layer``'s attention term of ``q`` (b, C, d_a) for users 0 .. b - 1 of the packed batch ``raw`` as S
    partial sums (S, b, C, d_a) fp32 (one per part of the histories; their sum is the term): the module docstring's
    kernel over the cached history, plus, with ``own``, each candidate's attention to itself (its K/V rows from
    :class:`SelfKV`, pool rows at fp32). ``flags`` (n_users,) int32: set to 1
    for a user with a router index outside the pool. ``chunks``: one launch per (lo, hi] byte range, serving the users
    whose records end in it, each after ``on_chunk(index)``, and ``on_chunk(len(chunks))`` after the last (as
    :func:`cachestore.decode.fused.fused_attention`'s). ``header``: the batch header (offsets, lengths: (2·n_users,)
    int64) when it is not ``raw``'s first bytes (a :mod:`cachestore.decode.layer_batch` batch's later layers). No
    host syncs."""
    cfg = resident.cfg
    b, c, d_a = q.shape
    heads = cfg.n_heads
    dh, gh = d_a // heads, config.heads_per_program
    pool_k, pool_v, bias = layer_tables(resident, KV_TORCH[pool_dtype(config, layout)])[layer]
    self_k, self_v, _ = layer_tables(resident, torch.float32)[layer]  # the candidate's own pool rows, exact
    g = next(g for g in layout.groups if g.name == f"layer{layer}")
    offset, rec = part_offsets(layout)
    ku, vu = f"{g.name}.k_user", f"{g.name}.v_user"  # every HSTU layer caches K and V
    ki, vi = g.idx_part("k"), g.idx_part("v")  # one kv_idx for both when joint
    widths = {p.name: p.width for p in layout.parts}
    k_code, v_code, _, _ = side_codes(g, layout.kv_dtype, user_halves(layout, g))
    k_scale, v_scale = group_scales(resident, g)
    rows, groups, max_n = b * c, heads // gh, layout.max_len
    check_chunks(chunks, raw)
    # as many parts as keep one launch's users' programs busy (a copy piece's launch serves ~1/len(chunks) of them)
    parts, seg = launch_shape(config, rows, groups, max(1, max_n), len(chunks), q.device)  # seg: whole blocks
    out = torch.empty(parts, rows, d_a, dtype=torch.float32, device=q.device)  # (S, b·C, d_a): each row written once
    if rows == 0:
        return out.view(parts, b, c, d_a)
    q_rows = as_rows(q)  # (b·C, d_a): a view of the projection's output where it can be
    mine = own or SelfKV(q_rows[:, :0], None, q_rows[:, :0], None)
    k_user, v_user = mine.k_user, mine.v_user
    stages = {} if config.num_stages is None else {"num_stages": config.num_stages}
    header = raw[: 16 * n_users].view(torch.int64) if header is None else header  # (2·n_users,) offsets, lengths
    for index, (end_lo, end_hi) in enumerate(chunks):
        if on_chunk is not None:
            on_chunk(index)
        _hstu_history_kernel[(rows, groups, parts)](
            raw, header, q_rows, q_rows.stride(0), bias, pool_k, pool_v, out, flags,
            k_user, k_user.stride(0), v_user, v_user.stride(0), flags if mine.k_idx is None else mine.k_idx,
            flags if mine.v_idx is None else mine.v_idx, self_k, self_v, n_users, c, 1.0 / math.sqrt(dh),
            1.0 / float(cfg.max_len), cfg.collective.pool_size, float(k_scale), float(v_scale), end_lo, end_hi,
            D_A=d_a, GH=gh, DH=dh, DK=widths[ku], DV=widths[vu], K_SHARED=ki is not None, V_SHARED=vi is not None,
            K_CODE=k_code, V_CODE=v_code, JOINT=g.joint, IDX_BYTES=IDX_BYTES[layout.idx_dtype], HEADER=HEADER_SIZE,
            OFF_KU=offset[ku], OFF_VU=offset[vu], OFF_KI=offset.get(ki or "", 0), OFF_VI=offset.get(vi or "", 0),
            REC=rec, SELF=own is not None, SKW=k_user.shape[1], SVW=v_user.shape[1],
            SK_SHARED=mine.k_idx is not None, SV_SHARED=mine.v_idx is not None, BLOCK_L=config.block_l, MAX_N=max_n,
            LOOP_N=seg if INTERPRETED else 0, SEG=seg, num_warps=config.num_warps, **stages,
        )
    if on_chunk is not None:
        on_chunk(len(chunks))  # after the last launch: a caller that switched streams joins them here
    return out.view(parts, b, c, d_a)  # (S, b, C, d_a): partial sums over the parts of each history


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
    if any(p.cap != layout.max_len for p in layout.parts):  # part_offsets: every part holds min(n, max_len) rows
        raise ValueError("the fused HSTU decode reads stores whose every part holds max_len rows")
    device = next(resident.model.parameters()).device  # concrete (cuda:0 where the resident says cuda)
    if raw.dtype != torch.uint8 or raw.device != device or candidates.device != device:
        raise ValueError(f"the packed batch (uint8) and the candidates must be on the model's device {device}")
    if candidates.dim() != 2 or candidates.shape[0] > n_users:
        raise ValueError(f"candidates {tuple(candidates.shape)}: want (b, C) with b <= {n_users} users")
    dh = cfg.d_attn // cfg.n_heads
    if dh & (dh - 1) or cfg.n_heads % config.heads_per_program:
        raise ValueError(f"the fused kernel needs a power-of-two head dim ({dh}) and heads_per_program dividing "
                         f"{cfg.n_heads} ({config.heads_per_program})")


def _layer_sources(raw: torch.Tensor, rest: torch.Tensor | None, layout: EntryLayout, n_users: int, layers: int
                   ) -> list[tuple[torch.Tensor, EntryLayout, torch.Tensor | None]]:
    """Per layer: (the bytes its history kernel reads, their layout, their batch header or None: ``raw``'s first)."""
    if rest is None:
        return [(raw, layout, None)] * layers
    split = split_layouts(layout)
    if split is None or rest.dtype != torch.uint8 or rest.device != raw.device:
        raise ValueError("a batch split by layer needs an HSTU store of several layers and its second buffer (uint8) "
                         "on the batch's device")
    header = raw[16 * n_users : header_bytes(n_users)].view(torch.int64)  # (2·n_users,) the second buffer's header
    return [(raw, split[0], None)] + [(rest, split[1], header)] * (layers - 1)


def hstu_static_decode(raw: torch.Tensor, candidates: torch.Tensor, *, resident: ResidentZooModel,
                       layout: EntryLayout, n_users: int, config: FusedConfig = DEFAULT_FUSED,
                       flags: torch.Tensor | None = None, chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                       on_chunk: Callable[[int], None] | None = None, rest: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Logits (b, C) of ``candidates`` (b, C) int64 of users 0 .. b - 1 (b <= n_users) against the packed batch
    ``raw`` (uint8 on the resident's device, :mod:`cachestore.decode.batch`) of an HSTU store: ``HSTU.decode`` with
    each layer's candidate work from :func:`cachestore.decode.fused_hstu_candidate.candidate_layer` and its attention
    from :func:`hstu_history` (launched with ``config``; history pool rows at ``config.pool_dtype``, the store's
    precision by default). Shape-static and free of host syncs with ``flags`` ((n_users,) int32, set to 1 for a user
    with a router index outside the pool; the caller raises after the batch): CUDA-graph capturable once
    :func:`layer_tables` (both dtypes) and the candidate module's caches exist (a first eager call builds them).
    Without ``flags``: a ``RouterIndexError`` naming the batch row, after a host sync. ``chunks`` / ``on_chunk``: the
    first layer's history launches (:func:`hstu_history`; its candidate work, which reads no batch byte, comes
    before ``on_chunk(0)``); the later layers read the batch after ``on_chunk(len(chunks))``, where a CUDA graph
    copying the batch in those pieces has joined them (:class:`cachestore.decode.graphs.GraphedDecoder`). Call under
    ``inference_mode`` / ``no_grad``. ``rest``: the batch is split by layer (:mod:`cachestore.decode.layer_batch`):
    ``raw`` holds its first buffer (layer 0's records), ``rest`` its second (the later layers', their header at
    ``raw``'s bytes 16·n_users .. 32·n_users)."""
    check_hstu_batch(raw, candidates, resident, layout, n_users, config)
    sources = _layer_sources(raw, rest, layout, n_users, len(resident.model.layers))
    model = resident.model
    flag = torch.zeros(n_users, dtype=torch.int32, device=raw.device) if flags is None else flags
    t = model.item_embedding(candidates)  # (b, C, E)
    x = t
    for i, layer in enumerate(model.layers):
        u, q, own = candidate_layer(resident, i, layer.norm_in(x))
        first = i == 0
        batch, its_layout, header = sources[i]
        history = hstu_history(batch, q, i, resident=resident, layout=its_layout, n_users=n_users, flags=flag,
                               config=config, own=own, chunks=chunks if first else ALL_BYTES,
                               on_chunk=on_chunk if first else None, header=header)
        x = x + layer.out(norm_gate(history, layer.norm_out, u))  # HSTULayer.update, its norm and gate in one launch
    logits = model.score_hidden(x, t, head=mlp_logits)  # (b, C)
    if flags is None and bool(flag.any()):
        raise RouterIndexError(f"a router index outside the pool 0..{resident.cfg.collective.pool_size - 1} in "
                               f"batch row {int(torch.nonzero(flag)[0, 0])}: the record is corrupt "
                               "(run `ckv store verify STORE`)")
    return logits
