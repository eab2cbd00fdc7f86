"""Long-stage kernels of the zoo models (SIM, ETA, SDIM, TWIN) straight from the packed batch bytes (Triton).

They read one K/V group of each user's record in place (:class:`cachestore.decode.fused_view.GroupView`: user parts,
router indices, pools zero-padded in the user dims, rows rebuilt as user part ⊕ pool row as in
:mod:`cachestore.decode.fused`) and never write K/V per user:

    :func:`group_scores`    scores (R, H, cap) fp32, R = B·C: per head h (cols h·dh .. h·dh + dh - 1)
                            q[r, cols] · key_l[cols] / sqrt(dh) for rows l < rows[b] of user b = r // C, and
                            float32's lowest value at l >= rows[b] (``model.retrieval.topk_target_attention``'s
                            fill: every real score ranks above it);
    :func:`weighted_values` out (R, G, W) fp32 = Σ_s weights[r, g, s] · val_{pos[r, g, s]}[g·step .. g·step + W - 1]
                            over s < S, the rows at positions ``pos`` (or s itself without positions) of user
                            b = r // C; rows l >= rows[b] and zero weights are skipped;
    :func:`bucket_sums`     out (R, m, d_a) fp32 = Σ over rows l < rows[b] whose bucket g (read from the packed
                            key bytes of the record) equals the candidate's, of val_l (V-only group).

SIM / ETA: :func:`cachestore.decode.fused_select.key_select` → :func:`cachestore.decode.fused.attend_group` over
the selected rows. TWIN: scores → per-head ``fused_select.row_topk`` with the softmax weights in the same kernel →
weighted_values with G = H heads of W = dh columns. SDIM: bucket_sums, then :func:`unit_mean` (L2-normalise,
mean over the hash functions). User parts are read at the store's kv dtype or as int8 codes × the group's scale; a
joint group's one index part (``kv_idx``, where ``k_idx`` would be) picks both pool rows. Router indices outside
the pool are read as zeros and set ``flags[b] = 1``. Tested under Triton's interpreter against the models' own decode
(``tests/cachestore/decode/test_fused_zoo.py``, ``test_fused_zoo_half.py``).
"""

from __future__ import annotations

import math

import torch

from collectivekv.cachestore.decode.fused import IDX_BYTES, INTERPRETED, triton
from collectivekv.cachestore.decode.fused_config import ALL_BYTES, serves_everyone
from collectivekv.cachestore.decode.fused_view import GroupView, side_codes

SCORE_FILL = torch.finfo(torch.float32).min  # group_scores' score past a user's rows: every real score ranks above it

if triton is not None:
    import triton.language as tl

    from collectivekv.cachestore.decode.fused import _gather_rows, _load_idx, _load_side, _pool_rows

    @triton.jit
    def _idx_bytes(raw_ptr, base, ls, mask, IDX_BYTES: tl.constexpr):
        """Router indices of rows ``ls`` from the index part at byte ``base``, read byte by byte (a part that can
        start off a 2-byte boundary: after int8 user codes of odd width); 0 where masked."""
        ik = ls * 0
        for k in tl.static_range(IDX_BYTES):
            ik = ik | (tl.load(raw_ptr + base + ls * IDX_BYTES + k, mask=mask, other=0).to(tl.int32) << (8 * k))
        return ik

    @triton.jit
    def _packed_keys(raw_ptr, key_start, ls, lmask, KEY_BYTES: tl.constexpr, BLOCK_L: tl.constexpr):
        """(BLOCK_L,) int64 packed retrieval keys of rows ``ls`` (little-endian bytes at key_start + l·KEY_BYTES;
        0 where masked)."""
        word = tl.zeros([BLOCK_L], dtype=tl.int64)
        for k in tl.static_range(KEY_BYTES):
            byte = tl.load(raw_ptr + key_start + ls * KEY_BYTES + k, mask=lmask, other=0).to(tl.int64)
            word = word | (byte << (8 * k))
        return word

    @triton.jit
    def _serves(ends_ptr, b, end_lo, end_hi):
        """Whether this launch serves user b: its record ends in the launch's (end_lo, end_hi] (a copy piece)."""
        end = tl.load(ends_ptr + b)
        return (end > end_lo) & (end <= end_hi)

    @triton.jit
    def _popcount(x):
        """Set bits of each non-negative int64 of ``x`` (shifts and masks, as ``model.retrieval.popcount``)."""
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        x = x + (x >> 32)
        return x & 0x7F

    @triton.jit
    def _group_scores_kernel(
        raw_ptr, starts_ptr, rows_ptr, ends_ptr, q_ptr, pool_k_ptr, out_ptr, flag_ptr, n_cand, scale, start_add,
        end_lo, end_hi, pool_size, lowest, k_scale, D_A: tl.constexpr, H: tl.constexpr, GH: tl.constexpr,
        DH: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, K_SHARED: tl.constexpr, K_CODE: tl.constexpr,
        K_BYTES: tl.constexpr, V_BYTES: tl.constexpr, IDX_BYTES: tl.constexpr, BLOCK_L: tl.constexpr,
        CAP: tl.constexpr, STEPS: tl.constexpr, TH: tl.constexpr,
    ):
        row = tl.program_id(0)  # b·C + c
        b = row // n_cand
        if _serves(ends_ptr, b, end_lo, end_hi):
            group = tl.program_id(1)  # heads group·GH .. group·GH + GH - 1
            start = tl.load(starts_ptr + b) + start_add
            n = tl.load(rows_ptr + b)
            kidx_base = start + n * (DK * K_BYTES + DV * V_BYTES)  # k_idx, or the joint kv_idx
            nbad = tl.zeros([], dtype=tl.int32)
            for step in tl.static_range(STEPS):  # this program's STEPS blocks of BLOCK_L rows
                ls = (tl.program_id(2) * STEPS + step) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,) rows
                lmask = ls < n
                ik = _load_idx(raw_ptr, kidx_base, ls, lmask, IDX_BYTES) if K_SHARED else ls  # ls: unread
                for t in tl.static_range(GH // TH):  # TH heads a (BLOCK_L, TH·DH) tile; TH 1: the 1-head sums
                    nbad = _head_scores(raw_ptr, q_ptr, pool_k_ptr, out_ptr, row, group * (GH // TH) + t, start, ls,
                                        lmask, ik, nbad, scale, pool_size, lowest, k_scale, D_A, H, TH, DH, DK,
                                        K_SHARED, K_CODE, BLOCK_L, CAP)
            tl.store(flag_ptr + b, 1, mask=nbad > 0)

    @triton.jit
    def _head_scores(raw_ptr, q_ptr, pool_k_ptr, out_ptr, row, group, start, ls, lmask, ik, nbad, scale, pool_size,
                     lowest, k_scale, D_A: tl.constexpr, H: tl.constexpr, GH: tl.constexpr, DH: tl.constexpr,
                     DK: tl.constexpr, K_SHARED: tl.constexpr, K_CODE: tl.constexpr, BLOCK_L: tl.constexpr,
                     CAP: tl.constexpr):
        """Scores of heads group·GH .. group·GH + GH - 1 (one tile) over rows ``ls`` (router indices ``ik``)."""
        cols = group * GH * DH + tl.arange(0, GH * DH)  # (GH·DH,)
        q = tl.load(q_ptr + row * D_A + cols).to(tl.float32) * scale
        heads = group * GH + tl.arange(0, GH)  # (GH,)
        key = _load_side(raw_ptr, start, ls, cols, lmask, DK, K_CODE, k_scale)  # (BLOCK_L, GH·DH)
        if K_SHARED:
            pool, nbad = _gather_rows(pool_k_ptr, ik, cols, lmask, nbad, pool_size, D_A)
            key += pool
        s = tl.sum(tl.reshape(key * q[None, :], (BLOCK_L, GH, DH)), axis=2)  # (BLOCK_L, GH)
        s = tl.where(lmask[:, None], s, lowest)
        tl.store(out_ptr + (row * H + heads[None, :]) * CAP + ls[:, None], s, mask=(ls < CAP)[:, None])
        return nbad

    @triton.jit
    def _weighted_values_kernel(
        raw_ptr, starts_ptr, rows_ptr, ends_ptr, w_ptr, pos_ptr, pool_v_ptr, out_ptr, flag_ptr, n_cand, start_add,
        end_lo, end_hi, pool_size, v_scale, D_A: tl.constexpr, G: tl.constexpr, W: tl.constexpr, STEP: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, V_CODE: tl.constexpr,
        K_BYTES: tl.constexpr, V_BYTES: tl.constexpr, JOINT: tl.constexpr, IDX_BYTES: tl.constexpr,
        HAS_POS: tl.constexpr, S: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        row = tl.program_id(0)  # b·C + c
        b = row // n_cand
        if _serves(ends_ptr, b, end_lo, end_hi):
            _weighted_row(raw_ptr, starts_ptr, rows_ptr, w_ptr, pos_ptr, pool_v_ptr, out_ptr, flag_ptr, row, b,
                          start_add, pool_size, v_scale, D_A, G, W, STEP, DK, DV, K_SHARED, V_SHARED, V_CODE, K_BYTES,
                          V_BYTES, JOINT, IDX_BYTES, HAS_POS, S, BLOCK_L)

    @triton.jit
    def _weighted_row(raw_ptr, starts_ptr, rows_ptr, w_ptr, pos_ptr, pool_v_ptr, out_ptr, flag_ptr, row, b, start_add,
                      pool_size, v_scale, D_A: tl.constexpr, G: tl.constexpr, W: tl.constexpr, STEP: tl.constexpr,
                      DK: tl.constexpr, DV: tl.constexpr, K_SHARED: tl.constexpr, V_SHARED: tl.constexpr,
                      V_CODE: tl.constexpr, K_BYTES: tl.constexpr, V_BYTES: tl.constexpr, JOINT: tl.constexpr,
                      IDX_BYTES: tl.constexpr, HAS_POS: tl.constexpr, S: tl.constexpr, BLOCK_L: tl.constexpr):
        """The weighted sum of row ``row`` (user b) and the program's head or hash function (kernel above)."""
        g = tl.program_id(1)  # head or hash function
        start = tl.load(starts_ptr + b) + start_add
        n = tl.load(rows_ptr + b)
        # v_idx after k_idx; JOINT: the one kv_idx picks the V row too
        vidx_base = start + n * (DK * K_BYTES + DV * V_BYTES) + n * (IDX_BYTES if K_SHARED and not JOINT else 0)
        cols = g * STEP + tl.arange(0, W)  # (W,)
        acc = tl.zeros([W], dtype=tl.float32)
        nbad = tl.zeros([], dtype=tl.int32)
        for j0 in range(0, S, BLOCK_L):
            js = j0 + tl.arange(0, BLOCK_L)
            jmask = js < S
            w = tl.load(w_ptr + (row * G + g) * S + js, mask=jmask, other=0.0)  # (BLOCK_L,)
            ls = tl.load(pos_ptr + (row * G + g) * S + js, mask=jmask, other=0).to(tl.int32) if HAS_POS else js
            lmask = jmask & (ls >= 0) & (ls < n) & (w != 0.0)
            val = _load_side(raw_ptr, start + n * DK * K_BYTES, ls, cols, lmask, DV, V_CODE, v_scale)  # (BLOCK_L, W)
            if V_SHARED:
                pool, nbad = _pool_rows(raw_ptr, pool_v_ptr, vidx_base, ls, cols, lmask, nbad, pool_size, D_A,
                                        IDX_BYTES)
                val += pool
            acc += tl.sum(tl.where(lmask, w, 0.0)[:, None] * val, axis=0)
        tl.store(out_ptr + (row * G + g) * W + tl.arange(0, W), acc)
        tl.store(flag_ptr + b, 1, mask=nbad > 0)

    @triton.jit
    def _sum_hits(raw_ptr, pool_v_ptr, start, hits, hit_idx, js, jm, cols, acc, nbad, pool_size, v_scale,
                  D_A: tl.constexpr, DV: tl.constexpr, V_SHARED: tl.constexpr, V_CODE: tl.constexpr):
        """Add to acc (W,) the V rows of the hits ``js`` (BLOCK_L,) where ``jm``: user part at the position kept in
        ``hits`` ⊕ the pool row of the router index kept in ``hit_idx`` (both loads one level deep)."""
        ls = tl.load(hits + js, mask=jm, other=0)
        val = _load_side(raw_ptr, start, ls, cols, jm, DV, V_CODE, v_scale)  # (BLOCK_L, W), 0 where masked
        if V_SHARED:
            pool, nbad = _gather_rows(pool_v_ptr, tl.load(hit_idx + js, mask=jm, other=0), cols, jm, nbad,
                                      pool_size, D_A)
            val += pool
        return acc + tl.sum(val, axis=0), nbad

    @triton.jit
    def _bucket_sums_kernel(
        raw_ptr, starts_ptr, rows_ptr, ends_ptr, key_starts_ptr, target_ptr, pool_v_ptr, out_ptr, flag_ptr, hits_ptr,
        n_cand, start_add, end_lo, end_hi, pool_size, v_scale, D_A: tl.constexpr, G: tl.constexpr, DV: tl.constexpr,
        V_SHARED: tl.constexpr, V_CODE: tl.constexpr, V_BYTES: tl.constexpr, IDX_BYTES: tl.constexpr,
        IDX_ALIGNED: tl.constexpr, KEY_BYTES: tl.constexpr, BITS: tl.constexpr, KEY_DIV: tl.constexpr,
        BLOCK_L: tl.constexpr, SEG: tl.constexpr, SEG_P2: tl.constexpr, W: tl.constexpr, STATIC: tl.constexpr,
    ):
        """Program (row, g, part·(D_A / W) + w): the rows part·SEG .. of user b = row // n_cand whose bucket g
        equals the candidate's, columns w·W .. w·W + W - 1. One pass reads all SEG keys and router indices at once
        and writes the hits' positions and indices, in order, to the program's slices of ``hits_ptr`` (2 × SEG_P2
        int32); the V rows are then summed over those hits only, BLOCK_L at a time (~SEG / 2^BITS of them: no step
        over rows that miss). STATIC: loop to SEG_P2 with masks (Triton's CPU interpreter cannot loop to a
        computed bound). Users whose record ends outside (end_lo, end_hi] are another launch's."""
        row = tl.program_id(0)  # b·C + c
        b = row // n_cand
        if _serves(ends_ptr, b, end_lo, end_hi):
            _bucket_row(raw_ptr, starts_ptr, rows_ptr, key_starts_ptr, target_ptr, pool_v_ptr, out_ptr, flag_ptr,
                        hits_ptr, row, b, start_add, pool_size, v_scale, D_A, G, DV, V_SHARED, V_CODE, V_BYTES,
                        IDX_BYTES, IDX_ALIGNED, KEY_BYTES, BITS, KEY_DIV, BLOCK_L, SEG, SEG_P2, W, STATIC)

    @triton.jit
    def _bucket_row(raw_ptr, starts_ptr, rows_ptr, key_starts_ptr, target_ptr, pool_v_ptr, out_ptr, flag_ptr,
                    hits_ptr, row, b, start_add, pool_size, v_scale, D_A: tl.constexpr, G: tl.constexpr,
                    DV: tl.constexpr, V_SHARED: tl.constexpr, V_CODE: tl.constexpr, V_BYTES: tl.constexpr,
                    IDX_BYTES: tl.constexpr, IDX_ALIGNED: tl.constexpr, KEY_BYTES: tl.constexpr, BITS: tl.constexpr,
                    KEY_DIV: tl.constexpr, BLOCK_L: tl.constexpr, SEG: tl.constexpr, SEG_P2: tl.constexpr,
                    W: tl.constexpr, STATIC: tl.constexpr):
        """The bucket sum of row ``row`` (user b) for the program's hash function, part and columns (kernel above)."""
        g = tl.program_id(1)  # hash function
        part = tl.program_id(2) // (D_A // W)
        cols = (tl.program_id(2) % (D_A // W)) * W + tl.arange(0, W)  # (W,)
        start = tl.load(starts_ptr + b) + start_add
        n = tl.load(rows_ptr + b)
        target = tl.load(target_ptr + row * G + g)  # the candidate's bucket of hash function g
        ls = part * SEG + tl.arange(0, SEG_P2)  # (SEG_P2,)
        lmask = (ls < part * SEG + SEG) & (ls < n)
        word = _packed_keys(raw_ptr, tl.load(key_starts_ptr + b), ls, lmask, KEY_BYTES, SEG_P2)
        if KEY_DIV > 1:  # the bytes read are a router index: its block is the packed bucket code
            word = word // KEY_DIV
        hit = lmask & (((word >> (g * BITS).to(tl.int64)) & ((1 << BITS) - 1)) == target)
        hits = hits_ptr + ((tl.program_id(2) * tl.num_programs(0) + row) * G + g).to(tl.int64) * (2 * SEG_P2)
        at = tl.cumsum(hit.to(tl.int32), axis=0) - 1  # (SEG_P2,) a hit's place among the hits
        tl.store(hits + at, ls, mask=hit)  # positions, packed in order
        if V_SHARED:  # their router indices, read here with the keys (coalesced), not per hit later
            vidx = start + n * DV * V_BYTES
            iv = _load_idx(raw_ptr, vidx, ls, hit, IDX_BYTES) if IDX_ALIGNED else _idx_bytes(raw_ptr, vidx, ls, hit,
                                                                                             IDX_BYTES)
            tl.store(hits + SEG_P2 + at, iv, mask=hit)
        n_hits = tl.sum(hit.to(tl.int32), axis=0)
        tl.debug_barrier()  # the hits written above are read below by other threads of this program
        acc = tl.zeros([W], dtype=tl.float32)
        nbad = tl.zeros([], dtype=tl.int32)
        if STATIC:
            for j0 in range(0, SEG_P2, BLOCK_L):
                js = j0 + tl.arange(0, BLOCK_L)
                acc, nbad = _sum_hits(raw_ptr, pool_v_ptr, start, hits, hits + SEG_P2, js, js < n_hits, cols, acc,
                                      nbad, pool_size, v_scale, D_A, DV, V_SHARED, V_CODE)
        else:
            for j0 in range(0, n_hits, BLOCK_L):
                js = j0 + tl.arange(0, BLOCK_L)
                acc, nbad = _sum_hits(raw_ptr, pool_v_ptr, start, hits, hits + SEG_P2, js, js < n_hits, cols, acc,
                                      nbad, pool_size, v_scale, D_A, DV, V_SHARED, V_CODE)
        tl.store(out_ptr + ((part * tl.num_programs(0) + row) * G + g) * D_A + cols, acc)
        tl.store(flag_ptr + b, 1, mask=nbad > 0)

    @triton.jit
    def _unit_mean_kernel(sums_ptr, out_ptr, eps, M: tl.constexpr, MP2: tl.constexpr, D_A: tl.constexpr):
        """Program r: out[r] = mean over g < M of sums[r, g] / max(‖sums[r, g]‖₂, eps) (d_a wide)."""
        r = tl.program_id(0)
        gs = tl.arange(0, MP2)
        cols = tl.arange(0, D_A)
        x = tl.load(sums_ptr + (r * M + gs[:, None]) * D_A + cols[None, :], mask=(gs < M)[:, None], other=0.0)
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)  # (MP2,)
        tl.store(out_ptr + r * D_A + cols, tl.sum(x / norm[:, None], axis=0) / M)


def served_ends(ends: torch.Tensor | None, rows: torch.Tensor, chunk: tuple[int, int]) -> torch.Tensor:
    """(B,) one past each user's record, the byte a launch's (lo, hi] ``chunk`` test reads: ``ends``; without them
    one launch serves every user (:data:`ALL_BYTES`), and ``rows`` (B,) (any non-negative counts, which pass that
    test) stand in."""
    if ends is not None:
        return ends
    if not serves_everyone((chunk,)):
        raise ValueError(f"a launch of chunk {tuple(chunk)} reads the users' record ends: none were given")
    return rows


def launch_ends(view: GroupView, chunk: tuple[int, int]) -> torch.Tensor:
    """:func:`served_ends` of the group ``view`` (its ``ends`` and ``rows``)."""
    return served_ends(view.ends, view.rows, chunk)


def _block(n: int, most: int = 64) -> int:
    """The smallest power of two >= n, capped at ``most`` (rows per program step)."""
    return min(most, 1 << max(0, n - 1).bit_length())


def group_scores(raw: torch.Tensor, q: torch.Tensor, view: GroupView, pool_k: torch.Tensor, n_heads: int,
                 flags: torch.Tensor, *, heads_per_program: int = 1, num_warps: int = 1,
                 scales: tuple[float, float] = (1.0, 1.0), chunk: tuple[int, int] = ALL_BYTES[0],
                 out: torch.Tensor | None = None, blocks_per_program: int = 1, head_loop: bool = False
                 ) -> torch.Tensor:
    """Scores (B·C, H, cap) fp32 of ``q`` (B, C, d_a) over every row of the group ``view`` (module docstring),
    each program scoring ``blocks_per_program`` blocks of rows (the same sums whatever it is) of
    ``heads_per_program`` heads, as one tile or (``head_loop``) each head on its own (the one-head launch's sums);
    pool_k: (pool, d_a) padded K pool (1 zero row when K is not shared; a joint pool's K columns for a joint
    index); scales: the (K, V) scales of int8 user parts (:func:`cachestore.decode.fused_view.group_scales`).
    ``chunk`` (lo, hi]: only the rows of users whose record ends in it are written (a copy piece's launch), into
    ``out`` when given (the other users' rows keep what they hold)."""
    b, c, d_a = q.shape
    dh, g = d_a // n_heads, view.group
    cap = max(1, g.cap)
    if out is None:
        out = torch.empty(b * c, n_heads, cap, dtype=torch.float32, device=q.device)  # (R, H, cap)
    if b * c == 0:
        return out
    block = _block(cap)
    k_code, _, k_bytes, v_bytes = side_codes(g, view.kv_dtype, view.halves)
    steps = max(1, blocks_per_program)
    _group_scores_kernel[(b * c, n_heads // heads_per_program, -(-cap // (block * steps)))](
        raw, view.starts, view.rows, launch_ends(view, chunk), q.float().contiguous(), pool_k, out, flags, c,
        1.0 / math.sqrt(dh), view.start_add, chunk[0], chunk[1], view.pool_size, SCORE_FILL, float(scales[0]),
        D_A=d_a, H=n_heads, GH=heads_per_program, DH=dh, DK=g.dk, DV=g.dv, K_SHARED=g.k_shared, K_CODE=k_code,
        K_BYTES=k_bytes, V_BYTES=v_bytes, IDX_BYTES=IDX_BYTES[view.idx_dtype], BLOCK_L=block, CAP=cap, STEPS=steps,
        TH=1 if head_loop else heads_per_program, num_warps=num_warps,
    )
    return out


def weighted_values(raw: torch.Tensor, view: GroupView, pool_v: torch.Tensor, weights: torch.Tensor,
                    positions: torch.Tensor | None, n_cand: int, width: int, step: int, flags: torch.Tensor, *,
                    num_warps: int = 1, scales: tuple[float, float] = (1.0, 1.0),
                    chunk: tuple[int, int] = ALL_BYTES[0], out: torch.Tensor | None = None) -> torch.Tensor:
    """(R, G, width) fp32 weighted sums of the group's V rows (module docstring): weights (R, G, S) float,
    positions (R, G, S) int64 or None (position s); g reads columns g·step .. g·step + width - 1 (a power of
    two); R = B·C rows, user r // n_cand. pool_v: (pool, d_a) padded V pool (1 zero row when not shared);
    scales, chunk and out as :func:`group_scores`'."""
    r, n_g, s = weights.shape
    g = view.group
    if width & (width - 1):
        raise ValueError(f"the weighted-value kernel reads a power-of-two width, got {width}")
    if g.dv == 0:
        raise ValueError(f"group {g.name!r} caches no V")
    if out is None:
        out = torch.empty(r, n_g, width, dtype=torch.float32, device=weights.device)  # (R, G, W)
    if r == 0:
        return out
    w = weights.float().contiguous()
    pos = w if positions is None else positions.contiguous()  # unread without positions
    _, v_code, k_bytes, v_bytes = side_codes(g, view.kv_dtype, view.halves)
    _weighted_values_kernel[(r, n_g)](
        raw, view.starts, view.rows, launch_ends(view, chunk), w, pos, pool_v, out, flags, n_cand, view.start_add,
        chunk[0], chunk[1], view.pool_size, float(scales[1]), D_A=pool_v.shape[1], G=n_g, W=width, STEP=step, DK=g.dk,
        DV=g.dv, K_SHARED=g.k_shared, V_SHARED=g.v_shared, V_CODE=v_code, K_BYTES=k_bytes, V_BYTES=v_bytes,
        JOINT=g.joint, IDX_BYTES=IDX_BYTES[view.idx_dtype], HAS_POS=positions is not None, S=max(1, s),
        BLOCK_L=_block(s, 32), num_warps=num_warps,
    )
    return out


def bucket_sums(raw: torch.Tensor, view: GroupView, pool_v: torch.Tensor, key_starts: torch.Tensor, key_bytes: int,
                bits: int, targets: torch.Tensor, n_cand: int, flags: torch.Tensor, *, block_l: int = 64,
                num_warps: int = 2, parts: int = 1, col_split: int = 2, v_scale: float = 1.0, idx_aligned: bool = True,
                key_div: int = 1, chunk: tuple[int, int] = ALL_BYTES[0], out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """SDIM's bucket sums (R, m, d_a) fp32: per row r (user b = r // n_cand) and hash function g, the sum of the
    V rows l < rows[b] of the V-only group ``view`` whose bucket g (bits g·bits .. of the row's ``key_bytes``
    packed key bytes at ``key_starts[b] + l·key_bytes``) equals ``targets[r, g]`` (targets (R, m) int64).
    pool_v: (pool, d_a) padded V pool (1 zero row when not shared); d_a a power of two. Each program reads its
    rows' keys and router indices in one pass and sums the V rows of the hits only (their positions and indices
    kept in a (parts · col_split, R, m, 2, rows) int32 scratch). ``parts`` > 1 splits each row's history into parts
    (one program each, summed after); ``col_split`` (a power of two) splits the d_a columns among that many
    programs, each reading the keys (the defaults, 64 rows a block and two column halves, were the fastest of the
    settings ``benchmarks/long_stage_launch.py`` sweeps on an H100). v_scale: the scale of int8 V user codes;
    idx_aligned False: the V index part can start off a 2-byte boundary
    (:func:`cachestore.decode.fused_view.may_misalign`), read byte by byte.
    ``key_div`` > 1: the key bytes are the V router index and its packed buckets are ``index // key_div`` (SDIM keyed
    by its index, ``model.longseq.SDIM``). ``chunk`` and ``out`` (R, m, d_a) as :func:`group_scores`' (a launch
    serving some users only writes a given ``out`` with ``parts`` 1)."""
    r, m = targets.shape
    g, d_a = view.group, pool_v.shape[1]
    if g.dk != 0 or d_a & (d_a - 1) or col_split & (col_split - 1) or col_split > d_a:
        raise ValueError(f"bucket sums read a V-only group of power-of-two width in a power-of-two split, got {g} at "
                         f"d_a {d_a}, col_split {col_split}")
    parts = max(1, min(parts, -(-max(1, g.cap) // block_l)))
    seg = -(-max(1, g.cap) // parts)  # rows per part
    seg_p2 = max(block_l, triton.next_power_of_2(seg))
    if out is not None and (out.shape != (r, m, d_a) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"bucket_sums writes a contiguous fp32 out of shape {(r, m, d_a)}, got {tuple(out.shape)}")
    if out is not None and parts > 1 and not serves_everyone((chunk,)):
        raise ValueError("bucket_sums writes some users' rows of a given out only with parts 1")
    partial = out[None] if out is not None and parts == 1 else torch.empty(parts, r, m, d_a, dtype=torch.float32,
                                                                            device=targets.device)  # (S, R, m, d_a)
    if r == 0:
        return partial[0]
    hits = torch.empty(parts * col_split, r, m, 2, seg_p2, dtype=torch.int32, device=targets.device)  # per program
    _, v_code, _, v_bytes = side_codes(g, view.kv_dtype, view.halves)
    _bucket_sums_kernel[(r, m, parts * col_split)](
        raw, view.starts, view.rows, launch_ends(view, chunk), key_starts, targets.contiguous(), pool_v, partial, flags,
        hits, n_cand, view.start_add, chunk[0], chunk[1], view.pool_size, float(v_scale), D_A=d_a, G=m, DV=g.dv,
        V_SHARED=g.v_shared, V_CODE=v_code, V_BYTES=v_bytes, IDX_BYTES=IDX_BYTES[view.idx_dtype],
        IDX_ALIGNED=idx_aligned, KEY_BYTES=key_bytes, BITS=bits, KEY_DIV=key_div, BLOCK_L=block_l, SEG=seg,
        SEG_P2=seg_p2, W=d_a // col_split, STATIC=INTERPRETED, num_warps=num_warps,
    )
    if parts == 1:
        return partial[0]  # (R, m, d_a)
    return partial.sum(0) if out is None else out.copy_(partial.sum(0))


def unit_mean(sums: torch.Tensor) -> torch.Tensor:
    """(R, d_a) fp32 mean over the m hash functions of each L2-normalised bucket sum (R, m, d_a) fp32 (d_a a power
    of two), as ``normalize(sums, dim=-1).mean(dim=1)`` (``model.retrieval``'s SDIM aggregation) in one launch."""
    r, m, d_a = sums.shape
    out = torch.empty(r, d_a, dtype=torch.float32, device=sums.device)
    if r:
        _unit_mean_kernel[(r,)](sums.contiguous(), out, 1e-12, M=m, MP2=triton.next_power_of_2(m), D_A=d_a,
                                num_warps=2)
    return out
