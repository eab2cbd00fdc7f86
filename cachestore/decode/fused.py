"""Fused collective target attention straight from the packed batch bytes (Triton; any K/V group of a record).

The eager serving path (:func:`cachestore.decode.transfer.unpack_entry` + :func:`cachestore.decode.decode.decode`)
turns the jagged records into padded (B, L, ·) tensors, casts them, then either materialises K/V or scores the
whole pool per user. At the paper's shape (B 512, L 1000, d_a 256, 8 heads, pool 10,000) that is ~1 ms of GPU
work even inside a CUDA graph, 10× the PCIe floor of the bytes it decodes. This module replaces unpack +
attention with ONE kernel that reads the device copy of the packed batch as it is, for one K/V group
(:class:`model.cache_spec.GroupSpec`: dk, dv, k_shared, v_shared, joint, int8_user; dk = 0 for V only)
placed per user by a :class:`GroupView` (``starts`` (B,), ``rows`` (B,) = min(n, cap)):

    program (b·C + c, g, s) — user b, candidate c, heads g·GH .. g·GH + GH - 1 (GH = heads_per_program),
      steps of part s (of S; S = 1 unless the launch has few programs: FusedConfig.split_l);
      for each of its heads h: dh = d_a / H, cols = h·dh .. h·dh + dh - 1
      group = raw[starts[b]:], n = rows[b]
      group bytes: k_user (n, dk) | v_user (n, dv) | k_idx (n,) | v_idx (n,)   (those the group has;
                   one kv_idx (n,) for both with a joint index, read once; int8 user codes × the model's scale)
      rows read: l = 0 .. n - 1, or (SELECT) l = sel[b·C + c, j] for j < n_sel[b·C + c]
      for blocks of BLOCK_L rows l (online softmax, fp32 accumulation):
          key_l = user_k[l, cols] (0 beyond dk) + P_k[k_idx[l], cols]   (pool rows zero in the user dims)
          s_l   = q[b, c, cols] · key_l / sqrt(dh)
          val_l = user_v[l, cols] (0 beyond dv) + P_v[v_idx[l], cols]
      out[b, c, cols] = Σ softmax(s)_l val_l        (zeros when no row is read)
      (S > 1: each part stores its running max, denominator and sum; a second kernel combines the parts)

din's one group is its whole record payload (:func:`din_view`: starts = the header's offsets + 32, rows = its
lengths, read in place: no device op before the first launch); the zoo models' groups sit at offsets computed from
the header (:func:`cachestore.decode.fused_zoo.entry_views`), so K/V = concat(user part, pool row) exactly as
``model.cache.rebuild_kv`` builds them, never written to memory: the kernel reads each behaviour's few user-part
bytes and index from the batch and two dh-wide pool rows (the pools, 2 × pool × d_a × 2 or 4 bytes, stay in L2). Pool
rows are read at the store's precision unless ``FusedConfig.pool_dtype`` says otherwise (:func:`pool_dtype`); stored
user parts and pool rows are cast to fp32 on load and everything after is fp32; indices are read as 16-bit halves, so
int32 indices need no 4-byte alignment. Without shared K/V (``mode`` full, or the unshared side) the user part is the
whole d_a row. The plain-PyTorch reference is the eager path; ``tests/cachestore/decode/test_fused.py`` checks the
two agree on CUDA, and under Triton's interpreter on CPU.

A launch may serve only the users whose records end in a byte range (``chunks``): the CUDA graph copies the batch
in pieces and launches the kernel once per piece as it lands (:mod:`cachestore.decode.graphs`). The pool-row reads
bound the kernel (at B 512, L 1000: 0.52 GB of fp16 rows, 1.05 GB of fp32, from L2), which is why the pool rows
follow the store's precision by default; its measured times, the floor kernel and the settings tried are in
docs/serving.md ("Fused kernel", "GPU results"). ``raw`` may also be a pinned host batch, which the kernel then
reads over PCIe (mapped, zero-copy) — measured slower than copying first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

from collectivekv.cachestore.decode.decode import ResidentModel
from collectivekv.cachestore.decode.fused_config import (
    ALL_BYTES,
    DEFAULT_FUSED,
    FusedConfig,
    check_chunks,
    check_launch,
    launch_shape,
    pool_dtype,
    serves_everyone,
)
from collectivekv.cachestore.decode.fused_mlp import mlp_logits
from collectivekv.cachestore.decode.fused_view import GroupView, din_view, group_scales, padded_pools, side_codes
from collectivekv.cachestore.decode.transfer import KV_TORCH
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.record import RouterIndexError

try:  # Triton is optional: CUDA machines have it; CPU machines may run its interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

FUSED = "fused"  # the decode path name of this kernel (graphs, runtime, ckv score)
IDX_BYTES = {None: 0, "uint16": 2, "int32": 4}


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import, as here


def fused_available(device: torch.device | str) -> bool:
    """True where the fused kernel can run on ``device``: Triton importable and a CUDA device, or
    any device under Triton's interpreter (``TRITON_INTERPRET=1`` set before importing this module;
    for tests: it loops to the store's max_len, masked, since it cannot loop to a loaded bound)."""
    return triton is not None and (torch.device(device).type == "cuda" or INTERPRETED)


def uses_fused(path: str, device: torch.device | str) -> bool:
    """Whether decode ``path`` runs this kernel on ``device``: "fused" always (where it cannot run, the
    kernel call says so), "auto" on CUDA where Triton is available."""
    return path == FUSED or (path == "auto" and torch.device(device).type == "cuda" and fused_available(device))


if triton is not None:

    @triton.jit
    def _load_idx(raw_ptr, base, ls, mask, IDX_BYTES: tl.constexpr):
        """Router indices of behaviours ``ls`` from the index part starting at byte ``base``, read as
        little-endian 16-bit halves (int32 indices need no 4-byte alignment); 0 where masked."""
        half = (raw_ptr + base).to(tl.pointer_type(tl.int16))
        lo = tl.load(half + ls * (IDX_BYTES // 2), mask=mask, other=0).to(tl.int32) & 0xFFFF
        if IDX_BYTES == 4:
            hi = tl.load(half + ls * 2 + 1, mask=mask, other=0).to(tl.int32)
            lo = lo | (hi << 16)
        return lo

    @triton.jit
    def _load_user(raw_ptr, base, ls, cols, lmask, WIDTH: tl.constexpr, KV_CODE: tl.constexpr):
        """(BLOCK_L, W) fp32 user part of behaviours ``ls`` at columns ``cols`` (W,) (0 for cols >= WIDTH); KV_CODE
        4: fp32 values read as two little-endian 16-bit halves (a part that can start at a 2-byte boundary)."""
        mask = lmask[:, None] & (cols[None, :] < WIDTH)
        at = ls[:, None] * WIDTH + cols[None, :]  # (BLOCK_L, W) value offsets
        if KV_CODE == 4:
            half = (raw_ptr + base).to(tl.pointer_type(tl.int16))
            lo = tl.load(half + 2 * at, mask=mask, other=0).to(tl.int32) & 0xFFFF
            hi = tl.load(half + 2 * at + 1, mask=mask, other=0).to(tl.int32)
            rows = (lo | (hi << 16)).to(tl.float32, bitcast=True)
        else:
            if KV_CODE == 0:
                ptr = (raw_ptr + base).to(tl.pointer_type(tl.float16))
            elif KV_CODE == 1:
                ptr = (raw_ptr + base).to(tl.pointer_type(tl.bfloat16))
            else:
                ptr = (raw_ptr + base).to(tl.pointer_type(tl.float32))
            rows = tl.load(ptr + at, mask=mask, other=0.0).to(tl.float32)
        return rows

    @triton.jit
    def _load_side(raw_ptr, base, ls, cols, lmask, WIDTH: tl.constexpr, CODE: tl.constexpr, scale):
        """:func:`_load_user`, or for CODE 3 (int8 user codes, part kind q8) fp32 ``code · scale``."""
        if CODE == 3:
            ptr = (raw_ptr + base).to(tl.pointer_type(tl.int8))
            mask = lmask[:, None] & (cols[None, :] < WIDTH)
            codes = tl.load(ptr + ls[:, None] * WIDTH + cols[None, :], mask=mask, other=0).to(tl.float32)
            return codes * scale
        return _load_user(raw_ptr, base, ls, cols, lmask, WIDTH, CODE)

    @triton.jit
    def _positions(sel_ptr, row, js, stop, n, S: tl.constexpr, SELECT: tl.constexpr):
        """Rows of the group read at steps ``js`` (BLOCK_L,) and their mask: rows ``js`` (< stop) of the group,
        or (SELECT) the given positions ``sel[row, js]`` (kept where 0 <= position < n, the user's rows)."""
        jmask = js < stop
        if SELECT:
            ls = tl.load(sel_ptr + row * S + js, mask=jmask, other=0).to(tl.int32)
            lmask = jmask & (ls >= 0) & (ls < n)
        else:
            ls = js
            lmask = jmask
        return ls, lmask

    @triton.jit
    def _pool_rows(raw_ptr, pool_ptr, idx_base, ls, cols, lmask, nbad, pool_size, D_A: tl.constexpr,
                   IDX_BYTES: tl.constexpr):
        """(BLOCK_L, W) fp32 pool rows (padded, d_a wide) of behaviours ``ls`` at ``cols``, from the index part
        at byte ``idx_base``; indices outside 0 .. pool_size - 1 are counted in ``nbad`` and read as zeros."""
        ik = _load_idx(raw_ptr, idx_base, ls, lmask, IDX_BYTES)
        return _gather_rows(pool_ptr, ik, cols, lmask, nbad, pool_size, D_A)

    @triton.jit
    def _gather_rows(pool_ptr, ik, cols, lmask, nbad, pool_size, D_A: tl.constexpr):
        """(BLOCK_L, W) fp32 rows ``pool[ik]`` at ``cols``; indices outside the pool counted in ``nbad``, read as 0."""
        inside = (ik >= 0) & (ik < pool_size)
        nbad += tl.sum((lmask & (ik < 0)).to(tl.int32) + (lmask & (ik >= pool_size)).to(tl.int32), axis=0)
        rows = tl.load(pool_ptr + ik[:, None] * D_A + cols[None, :], mask=(lmask & inside)[:, None], other=0.0)
        return rows.to(tl.float32), nbad

    @triton.jit
    def _attend_block(
        raw_ptr, pool_k_ptr, pool_v_ptr, start, n, kidx_base, vidx_base, ls, lmask, q, cols, m_i, l_i, acc, nbad,
        pool_size, k_scale, v_scale, D_A: tl.constexpr, GH: tl.constexpr, DH: tl.constexpr, DK: tl.constexpr,
        DV: tl.constexpr, K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, K_CODE: tl.constexpr, V_CODE: tl.constexpr,
        K_BYTES: tl.constexpr, JOINT: tl.constexpr, IDX_BYTES: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """One online-softmax step of GH heads over the group's rows ``ls`` (BLOCK_L,) where ``lmask``
        (n: the user's rows in the group, which places the V part). q, cols: (GH·DH,); m_i, l_i: (GH,);
        acc: (GH, DH); nbad: router indices outside 0 .. pool_size - 1 seen so far (their pool loads are
        masked: never a read outside the pool). K_CODE / V_CODE: each user part's storage (fused_view: KV_CODES,
        HALVES_CODE, or Q8_CODE: int8 codes × k_scale / v_scale); JOINT: one index (at kidx_base) picks both rows."""
        key = _load_side(raw_ptr, start, ls, cols, lmask, DK, K_CODE, k_scale)  # (BLOCK_L, GH·DH)
        ik = ls * 0
        if K_SHARED:
            ik = _load_idx(raw_ptr, kidx_base, ls, lmask, IDX_BYTES)
            rows, nbad = _gather_rows(pool_k_ptr, ik, cols, lmask, nbad, pool_size, D_A)
            key += rows
        s = tl.sum(tl.reshape(key * q[None, :], (BLOCK_L, GH, DH)), axis=2)  # (BLOCK_L, GH)
        s = tl.where(lmask[:, None], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # (GH,)
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # an all-masked block (static bound)
        alpha = tl.exp(m_i - m_ref)  # (GH,)
        p = tl.exp(s - m_ref[None, :])  # (BLOCK_L, GH), 0 at masked positions
        val = _load_side(raw_ptr, start + n * DK * K_BYTES, ls, cols, lmask, DV, V_CODE, v_scale)  # (BLOCK_L, GH·DH)
        if V_SHARED:
            if JOINT:
                rows, nbad = _gather_rows(pool_v_ptr, ik, cols, lmask, nbad, pool_size, D_A)
            else:
                rows, nbad = _pool_rows(raw_ptr, pool_v_ptr, vidx_base, ls, cols, lmask, nbad, pool_size, D_A,
                                        IDX_BYTES)
            val += rows
        l_i = l_i * alpha + tl.sum(p, axis=0)
        pv = p[:, :, None] * tl.reshape(val, (BLOCK_L, GH, DH))  # (BLOCK_L, GH, DH)
        acc = acc * alpha[:, None] + tl.sum(pv, axis=0)  # (GH, DH)
        return m_new, l_i, acc, nbad

    @triton.jit
    def _group_attention_kernel(
        raw_ptr, starts_ptr, rows_ptr, ends_ptr, sel_ptr, nsel_ptr, q_ptr, pool_k_ptr, pool_v_ptr, out_ptr, m_ptr,
        l_ptr, flag_ptr, n_cand, scale, start_add, end_lo, end_hi, pool_size, k_scale, v_scale, D_A: tl.constexpr,
        GH: tl.constexpr, DH: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, K_SHARED: tl.constexpr,
        V_SHARED: tl.constexpr, K_CODE: tl.constexpr, V_CODE: tl.constexpr, K_BYTES: tl.constexpr,
        V_BYTES: tl.constexpr, JOINT: tl.constexpr, IDX_BYTES: tl.constexpr, HAS_ENDS: tl.constexpr,
        SELECT: tl.constexpr, S: tl.constexpr, BLOCK_L: tl.constexpr, MAX_L: tl.constexpr, SPLIT: tl.constexpr,
        SEG: tl.constexpr,
    ):
        row = tl.program_id(0)  # b·C + c: rows of q and out
        group = tl.program_id(1)  # heads group·GH .. group·GH + GH - 1
        part = tl.program_id(2)  # steps part·SEG .. part·SEG + SEG - 1 (SPLIT parts)
        b = row // n_cand  # the user in the batch
        start = tl.load(starts_ptr + b) + start_add  # byte offset of the group's first part
        n = tl.load(rows_ptr + b)  # the user's rows in the group
        kidx_base = start + n * (DK * K_BYTES + DV * V_BYTES)
        vidx_base = kidx_base + n * (IDX_BYTES if K_SHARED and not JOINT else 0)  # JOINT: the one index part
        # one past the user's record (HAS_ENDS), else past the group's last byte (din: the record's)
        end = tl.load(ends_ptr + b) if HAS_ENDS else vidx_base + n * (IDX_BYTES if V_SHARED else 0)
        mine = (end > end_lo) & (end <= end_hi)  # this launch serves the users whose records end in its chunk
        total = tl.minimum(tl.load(nsel_ptr + row), S) if SELECT else n  # steps of this row
        lo = part * SEG
        stop = tl.where(mine, tl.minimum(total, lo + SEG), lo)  # no steps for another launch's users
        cols = group * GH * DH + tl.arange(0, GH * DH)  # (GH·DH,) this group's columns of d_a
        q = tl.load(q_ptr + row * D_A + cols).to(tl.float32) * scale  # (GH·DH,)
        m_i = tl.full([GH], -float("inf"), tl.float32)  # running max per head
        l_i = tl.zeros([GH], dtype=tl.float32)  # running denominator per head
        acc = tl.zeros([GH, DH], dtype=tl.float32)
        nbad = tl.zeros([], dtype=tl.int32)  # router indices outside the pool (loads masked)
        if MAX_L > 0:  # Triton's CPU interpreter cannot loop to a loaded bound: static bound, masked
            for l0 in range(0, MAX_L, BLOCK_L):
                ls, lmask = _positions(sel_ptr, row, lo + l0 + tl.arange(0, BLOCK_L), stop, n, S, SELECT)
                m_i, l_i, acc, nbad = _attend_block(
                    raw_ptr, pool_k_ptr, pool_v_ptr, start, n, kidx_base, vidx_base, ls, lmask, q, cols, m_i, l_i,
                    acc, nbad, pool_size, k_scale, v_scale, D_A, GH, DH, DK, DV, K_SHARED, V_SHARED, K_CODE, V_CODE,
                    K_BYTES, JOINT, IDX_BYTES, BLOCK_L)
        else:
            for l0 in range(lo, stop, BLOCK_L):
                ls, lmask = _positions(sel_ptr, row, l0 + tl.arange(0, BLOCK_L), stop, n, S, SELECT)
                m_i, l_i, acc, nbad = _attend_block(
                    raw_ptr, pool_k_ptr, pool_v_ptr, start, n, kidx_base, vidx_base, ls, lmask, q, cols, m_i, l_i,
                    acc, nbad, pool_size, k_scale, v_scale, D_A, GH, DH, DK, DV, K_SHARED, V_SHARED, K_CODE, V_CODE,
                    K_BYTES, JOINT, IDX_BYTES, BLOCK_L)
        tl.store(flag_ptr + b, 1, mask=mine & (nbad > 0))  # the runtime raises after the batch, naming the user
        if SPLIT == 1:
            out = acc / tl.maximum(l_i, 1e-30)[:, None]  # (GH, DH); l_i == 0 only with no rows, where acc == 0
            tl.store(out_ptr + row * D_A + cols, tl.reshape(out, (GH * DH,)), mask=mine)
        else:  # partial softmax state of this part: (row, part) rows of the workspaces
            heads = group * GH + tl.arange(0, GH)  # (GH,)
            at = row * SPLIT + part
            tl.store(m_ptr + at * (D_A // DH) + heads, m_i, mask=mine)
            tl.store(l_ptr + at * (D_A // DH) + heads, l_i, mask=mine)
            tl.store(out_ptr + at * D_A + cols, tl.reshape(acc, (GH * DH,)), mask=mine)

    @triton.jit
    def _combine_parts_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, D_A: tl.constexpr, H: tl.constexpr,
                              DH: tl.constexpr, SPLIT: tl.constexpr):
        """out[row, head] = Σ_p e^(m_p - M) acc_p / Σ_p e^(m_p - M) l_p over the SPLIT parts (M = max_p m_p;
        parts with no behaviours have m = -inf, l = acc = 0; all empty: zeros)."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        parts = tl.arange(0, SPLIT)  # (SPLIT,)
        m = tl.load(m_ptr + (row * SPLIT + parts) * H + head)  # (SPLIT,)
        mx = tl.max(m, axis=0)
        w = tl.exp(m - tl.where(mx == -float("inf"), 0.0, mx))  # (SPLIT,), 0 for empty parts
        denom = tl.sum(w * tl.load(l_ptr + (row * SPLIT + parts) * H + head), axis=0)
        cols = head * DH + tl.arange(0, DH)  # (DH,)
        acc = tl.load(acc_ptr + (row * SPLIT + parts)[:, None] * D_A + cols[None, :])  # (SPLIT, DH)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.maximum(denom, 1e-30)
        tl.store(out_ptr + row * D_A + cols, out)


def attend_group(raw: torch.Tensor, q: torch.Tensor, view: GroupView, pools: tuple[torch.Tensor, torch.Tensor],
                 n_heads: int, flags: torch.Tensor, *, config: FusedConfig = DEFAULT_FUSED,
                 select: tuple[torch.Tensor, torch.Tensor] | None = None,
                 chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                 on_chunk: Callable[[int], None] | None = None,
                 scales: tuple[float, float] = (1.0, 1.0), out: torch.Tensor | None = None) -> torch.Tensor:
    """Target attention (B, C, d_a) fp32 of ``q`` (B, C, d_a) of users 0 .. B - 1 over the group ``view`` of
    the packed batch ``raw`` (the module docstring's kernel): over rows 0 .. rows[b] - 1, or with ``select``
    = (sel (B·C, S) int64, n_sel (B·C,) int64) over rows ``sel[b·C + c, :n_sel]`` only (SIM/ETA after
    retrieval; positions outside 0 .. rows[b] - 1 are skipped). pools: (P_k, P_v) (pool, d_a) rows zero in the
    user dims (:func:`padded_pools`; a 1-row zero tensor for a side not shared); flags (≥ B,) int32: set to 1
    for a user with a router index outside the pool. chunks / on_chunk as :func:`fused_attention`'s. scales: the
    (K, V) fp32 scales of int8 user parts (q8: ``ResidentZooModel.scales``; unread for float parts). ``out``: the
    (B, C, d_a) fp32 output to write, the rows of the users ``chunks`` serve (unsplit when those are not all)."""
    b, c, d_a = q.shape
    dh, g = d_a // n_heads, view.group
    q = q.float().contiguous()
    given = out is not None
    if out is None:
        out = torch.empty(b, c, d_a, dtype=torch.float32, device=q.device)  # (B, C, d_a)
    if b * c == 0:
        return out
    sel, n_sel = select if select is not None else (view.rows, view.rows)  # unread without SELECT
    span = max(1, sel.shape[-1] if select is not None else g.cap)
    stages = {} if config.num_stages is None else {"num_stages": config.num_stages}
    rows, groups = b * c, n_heads // config.heads_per_program
    parts, seg = launch_shape(config, rows, groups, span, len(chunks), q.device)
    if parts > 1 and given and not serves_everyone(chunks):  # the combine would rewrite the other launches' rows
        raise ValueError("attend_group writes some users' rows of a given out only unsplit (FusedConfig.split_l 1)")
    if parts == 1:
        acc, m, l = out, out, out  # the kernel writes the normalised output itself
    else:  # (rows·parts, ·) partial softmax states, combined below
        acc = torch.empty(rows * parts, d_a, dtype=torch.float32, device=q.device)
        m = torch.empty(rows * parts, n_heads, dtype=torch.float32, device=q.device)
        l = torch.empty(rows * parts, n_heads, dtype=torch.float32, device=q.device)  # noqa: E741
    ends = view.rows if view.ends is None else view.ends
    k_code, v_code, k_bytes, v_bytes = side_codes(g, view.kv_dtype, view.halves)
    for index, (end_lo, end_hi) in enumerate(chunks):
        if on_chunk is not None:
            on_chunk(index)
        _group_attention_kernel[(rows, groups, parts)](
            raw, view.starts, view.rows, ends, sel, n_sel, q, pools[0], pools[1], acc, m, l, flags, c,
            1.0 / math.sqrt(dh), view.start_add, end_lo, end_hi, view.pool_size, float(scales[0]), float(scales[1]),
            D_A=d_a, GH=config.heads_per_program, DH=dh, DK=g.dk, DV=g.dv, K_SHARED=g.k_shared, V_SHARED=g.v_shared,
            K_CODE=k_code, V_CODE=v_code, K_BYTES=k_bytes, V_BYTES=v_bytes, JOINT=g.joint,
            IDX_BYTES=IDX_BYTES[view.idx_dtype], HAS_ENDS=view.ends is not None, SELECT=select is not None,
            S=sel.shape[-1] if select is not None else 1, BLOCK_L=config.block_l, MAX_L=seg if INTERPRETED else 0,
            SPLIT=parts, SEG=seg, num_warps=config.num_warps, **stages,
        )
    if on_chunk is not None:
        on_chunk(len(chunks))  # after the last launch: a caller that switched streams joins them here
    if parts > 1:
        _combine_parts_kernel[(rows, n_heads)](acc, m, l, out, D_A=d_a, H=n_heads, DH=dh, SPLIT=parts, num_warps=1)
    return out


def fused_attention(raw: torch.Tensor, q: torch.Tensor, resident: ResidentModel, layout: EntryLayout,
                    n_users: int, *, config: FusedConfig = DEFAULT_FUSED,
                    chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                    on_chunk: Callable[[int], None] | None = None, flags: torch.Tensor | None = None) -> torch.Tensor:
    """Target attention (b, C, d_a) fp32 of ``q`` (b, C, d_a) for users 0 .. b - 1 (b <= n_users) of the
    packed batch ``raw`` of ``n_users`` users (uint8, header at 0: :mod:`cachestore.decode.batch`) on q's device,
    or for a CUDA q in pinned host memory: the kernel then reads the batch over PCIe as it goes (mapped,
    zero-copy: no separate host-to-device copy; the host buffer must not be refilled before it finishes)
    — the module docstring's kernel over the din group (:func:`din_view`), launched with
    ``config`` (:class:`FusedConfig`). Equals ``decode``'s attention on ``unpack(raw, ...)`` up to fp32
    summation order where it reads fp32 pool rows (an fp32 store, or ``pool_dtype="float32"``); otherwise
    up to the rounding of the pool rows to the store's (or ``pool_dtype``'s) precision.

    ``chunks``: one kernel launch per (lo, hi] byte range, serving the users whose records end in it (the
    ranges partition (-1, 2^62]; the batch header must be readable from the first launch on), each after
    ``on_chunk(index)`` — the hook a caller copying the batch in those chunks on another stream uses to
    make launch c wait for chunk c, or to issue it on a stream of its own
    (:class:`cachestore.decode.graphs.GraphedDecoder`
    with ``overlap``) — and once more as ``on_chunk(len(chunks))`` after the last launch, where that caller
    joins its streams. A history split into parts has its parts combined once, after that.

    ``flags`` ((n_users,) int32 on q's device): the kernel sets ``flags[b] = 1`` for a user with a router
    index outside the pool (those pool loads are masked, never read out of bounds); the caller raises after
    the batch. Without ``flags``: a ``RouterIndexError`` naming the batch row, after a host sync."""
    if triton is None:
        raise RuntimeError("the fused decode needs Triton (pip install triton), or use the eager path")
    cfg = resident.cfg
    view = din_view(raw, layout, n_users, cfg.collective.pool_size)  # header views, no device op
    g = view.group  # the din group: k_user (n, dk) | v_user (n, dv) | k_idx (n,) | v_idx (n,)  (or one kv_idx)
    b, c, d_a = q.shape
    if b > n_users or d_a != cfg.d_attn:
        raise ValueError(f"q {tuple(q.shape)} does not match a batch of {n_users} users × d_a {cfg.d_attn}")
    check_launch(resident.n_heads, d_a, config)
    if (g.k_shared and resident.pool_k is None) or (g.v_shared and resident.pool_v is None):
        raise ValueError("the store shares a K/V side the model has no pool for")
    if raw.device != q.device and not (q.device.type == "cuda" and raw.device.type == "cpu" and raw.is_pinned()):
        raise ValueError(f"the packed batch is on {raw.device}, q on {q.device}: the kernel reads the batch on "
                         "q's device, or in pinned host memory (mapped, zero-copy) for a CUDA q")
    check_chunks(chunks, raw)
    pools = padded_pools(resident, KV_TORCH[pool_dtype(config, layout)])
    flag = torch.zeros(n_users, dtype=torch.int32, device=q.device) if flags is None else flags
    out = attend_group(raw, q, view, pools, resident.n_heads, flag, config=config, chunks=chunks, on_chunk=on_chunk,
                       scales=group_scales(resident, g))
    if flags is None and bool(flag.any()):
        raise RouterIndexError(f"a router index outside the pool 0..{cfg.collective.pool_size - 1} in batch row "
                               f"{int(torch.nonzero(flag)[0, 0])}: the record is corrupt "
                               "(run `ckv store verify STORE`)")
    return out


def fused_decode(resident: ResidentModel, raw: torch.Tensor, layout: EntryLayout, n_users: int,
                 targets: torch.Tensor, config: FusedConfig = DEFAULT_FUSED, *,
                 chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                 on_chunk: Callable[[int], None] | None = None, flags: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of candidates ``targets`` (b,) or (b, C) of users 0 .. b - 1 (b <= n_users) against the
    packed batch ``raw`` on the resident model's device:
    ``TargetAttentionCTR.decode`` with :func:`fused_attention` (launched with ``config``) as its attention
    (no unpack; ``chunks``/``on_chunk``/``flags`` as there).
    Shape-static and free of host syncs (CUDA-graph capturable)."""
    if targets.shape[0] > n_users:
        raise ValueError(f"{targets.shape[0]} target rows for a batch of {n_users} users")
    return resident.model.decode(
        None, targets,  # type: ignore[arg-type]  (the attention below reads the batch, not a KVCache)
        attention=lambda q, _: fused_attention(raw, q, resident, layout, n_users, config=config, chunks=chunks,
                                               on_chunk=on_chunk, flags=flags).to(q.dtype),
        candidate_side=resident.candidate_side, head=mlp_logits)
