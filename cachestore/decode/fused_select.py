"""Top-k selection in registers for the zoo's long stages (Triton): one program per row finds the k-th largest
value by a binary search over its bit patterns (no sort) and writes the k best positions in position order.

    :func:`key_select`  SIM's / ETA's retrieval from the packed key bytes (or the keys of SIM's / ETA's pool rows,
                        through the router indices): every long row's rank, shared categories (or bits - Hamming
                        distance)·cap + l for eligible rows, and the positions of the k largest =
                        ``model.retrieval``'s selection (ties: later row first);
    :func:`row_topk`    the k largest of each row of TWIN's scores (:func:`cachestore.decode.fused_long.group_scores`),
                        ties later row first.

Tested under Triton's interpreter against ``model.retrieval`` and a stable sort
(``tests/cachestore/decode/test_fused_zoo.py``), and through the zoo's fused decode.
"""

from __future__ import annotations

import torch

from collectivekv.cachestore.decode.fused import triton
from collectivekv.cachestore.decode.fused_config import ALL_BYTES
from collectivekv.cachestore.decode.fused_long import SCORE_FILL, served_ends

# the order-preserving int32 of an fp32 (its bits, or bits ^ 0x7FFFFFFF when negative: :func:`_flip`) of the fill
_FILL_BITS = int(torch.tensor(SCORE_FILL).view(torch.int32))
_FILL_ORDER = _FILL_BITS ^ 0x7FFFFFFF if _FILL_BITS < 0 else _FILL_BITS

if triton is not None:
    import triton.language as tl

    from collectivekv.cachestore.decode.fused_long import _packed_keys, _popcount, _serves

    @triton.jit
    def _kth_largest(order, valid, K, LO: tl.constexpr, STEPS: tl.constexpr):
        """A threshold T for the K largest of ``order`` (int32, counted where ``valid``; K <= valid count, else T is
        LO and meaningless: callers mask it): either exactly K values are >= T, or T is the K-th largest value. A
        binary search over LO .. LO + 2^STEPS - 1 counting ``order >= mid`` over the row in registers (no sort),
        stopping once a count is exactly K."""
        lo = tl.full([], LO, tl.int64)
        hi = tl.full([], LO + (1 << STEPS) - 1, tl.int64)
        while lo < hi:
            mid = (lo + hi + 1) >> 1  # within int32: compared with the row as int32
            count = tl.sum((valid & (order >= mid.to(tl.int32))).to(tl.int32), axis=0)
            lo = tl.where(count >= K, mid, lo)
            hi = tl.where(count > K, hi, tl.where(count == K, mid, mid - 1))
        return lo.to(tl.int32)

    @triton.jit
    def _take_top(order, valid, K, T):
        """(take, at): which positions hold the K largest of ``order`` where ``valid`` (T from :func:`_kth_largest`
        or :func:`_score_threshold`: every value above T, and of those equal to T the later positions first, as
        many as K leaves), and each taken position's place 0 .. K - 1 in position order. The above and the tied
        counts travel packed in one int32 (low and high 16 bits; rows <= 4,096): one reduction, and one scan
        when some ties are left out (none are when exactly K values reach T, the usual end of the search)."""
        above = (valid & (order > T)).to(tl.int32)
        tie = (valid & (order == T)).to(tl.int32)
        packed = above + (tie << 16)
        total = tl.sum(packed, axis=0)
        skip = (total >> 16) - (K - (total & 0xFFFF))  # the earliest ties left out
        if skip == 0:
            hit = above + tie
            take = hit > 0
            at = tl.cumsum(hit, axis=0) - 1
        else:
            seen = tl.cumsum(packed, axis=0)  # inclusive: above (low 16 bits) and ties (high) up to each position
            ties_taken = tl.maximum((seen >> 16) - skip, 0)
            take = (above > 0) | ((tie > 0) & (ties_taken > 0))
            at = (seen & 0xFFFF) + ties_taken - 1
        return take, at

    @triton.jit
    def _flip(x):
        """An fp32's bits (int32) → its order-preserving int32 (signed order == float order), and back."""
        return tl.where(x < 0, x ^ 0x7FFFFFFF, x)

    @triton.jit
    def _as_float(o):
        """The fp32 whose order-preserving int32 is ``o``."""
        return _flip(o).to(tl.float32, bitcast=True)

    @triton.jit
    def _score_threshold(order, K, FILL: tl.constexpr, FLOAT_STEPS: tl.constexpr):
        """:func:`_kth_largest` for the order-preserving int32 of fp32 scores (positions not counted hold
        -2^31; K <= their count): the K-th largest, or a threshold above which exactly K lie. Bracketed by the
        row's maximum and the smallest score above FILL (group_scores' fill past a user's rows: a row with
        fewer than K others answers FILL at once), then bisected at the midpoint of the bracket's float values
        for FLOAT_STEPS steps (about 9 for 1,000 spread scores, against 16 bisecting the bits) and of its int32
        patterns after that (at most 32 more: a bracket always shrinks)."""
        top = tl.max(order, axis=0)
        real = order > FILL
        n_real = tl.sum(real.to(tl.int32), axis=0)
        n_fill = tl.sum((order >= FILL).to(tl.int32), axis=0)
        lo = tl.where(n_real >= K, tl.min(tl.where(real, order, top), axis=0),
                      tl.where(n_fill >= K, FILL, -(1 << 31))).to(tl.int64)
        hi = tl.where((n_real < K) & (n_fill >= K), FILL, top).to(tl.int64)
        step = 0
        while lo < hi:
            if step < FLOAT_STEPS:  # the bracket's float midpoint, kept inside lo + 1 .. hi
                m = (_as_float(lo.to(tl.int32)) * 0.5 + _as_float(hi.to(tl.int32)) * 0.5).to(tl.int32, bitcast=True)
                mid = tl.minimum(tl.maximum(_flip(m).to(tl.int64), lo + 1), hi)
            else:
                mid = (lo + hi + 1) >> 1
            count = tl.sum((order >= mid.to(tl.int32)).to(tl.int32), axis=0)
            lo = tl.where(count >= K, mid, lo)
            hi = tl.where(count > K, hi, tl.where(count == K, mid, mid - 1))
            step += 1
        return lo.to(tl.int32)

    @triton.jit
    def _key_select_kernel(raw_ptr, key_starts_ptr, rows_ptr, ends_ptr, target_ptr, idx_ptr, nsel_ptr, codes_ptr,
                           n_cand, n_codes, end_lo, end_hi, KEY_BYTES: tl.constexpr, BITS: tl.constexpr,
                           HAMMING: tl.constexpr, CAP: tl.constexpr, CAP_P2: tl.constexpr, K: tl.constexpr,
                           STEPS: tl.constexpr, FROM_IDX: tl.constexpr):
        """Row r = b·C + c of a user whose record ends in (end_lo, end_hi]: every long row's retrieval rank
        (score·CAP + l, distinct; eligible rows only), the K largest (or every eligible row) found by
        :func:`_kth_largest`, their positions stored in position order, and min(eligible rows, K). FROM_IDX: a row's
        key is ``codes[router index]``, the index read (KEY_BYTES wide) where its packed key would be; an index
        outside the codes reads key 0."""
        row = tl.program_id(0)
        b = row // n_cand
        if _serves(ends_ptr, b, end_lo, end_hi):
            _select_row(raw_ptr, key_starts_ptr, rows_ptr, target_ptr, idx_ptr, nsel_ptr, codes_ptr, row, b, n_codes,
                        KEY_BYTES, BITS, HAMMING, CAP, CAP_P2, K, STEPS, FROM_IDX)

    @triton.jit
    def _select_row(raw_ptr, key_starts_ptr, rows_ptr, target_ptr, idx_ptr, nsel_ptr, codes_ptr, row, b, n_codes,
                    KEY_BYTES: tl.constexpr, BITS: tl.constexpr, HAMMING: tl.constexpr, CAP: tl.constexpr,
                    CAP_P2: tl.constexpr, K: tl.constexpr, STEPS: tl.constexpr, FROM_IDX: tl.constexpr):
        """The retrieval of row ``row`` (user b): the kernel above."""
        ls = tl.arange(0, CAP_P2)  # (CAP_P2,)
        lmask = ls < tl.load(rows_ptr + b)
        key = _packed_keys(raw_ptr, tl.load(key_starts_ptr + b), ls, lmask, KEY_BYTES, CAP_P2)
        if FROM_IDX:  # the bytes read are a router index
            key = tl.load(codes_ptr + key, mask=lmask & (key < n_codes), other=0)
        target = tl.load(target_ptr + row)
        if HAMMING:  # ETA: nearer first; every row eligible
            score = BITS - _popcount((key ^ target) & ((1 << BITS) - 1))
            eligible = lmask
        else:  # SIM: more shared categories first; rows sharing none are not eligible
            score = _popcount(key & target & ((1 << BITS) - 1))
            eligible = lmask & (score > 0)
        rank = score.to(tl.int32) * CAP + ls  # (CAP_P2,) in 0 .. (BITS + 1)·CAP - 1
        n_sel = tl.minimum(tl.sum(eligible.to(tl.int32), axis=0), K)
        take, at = _take_top(rank, eligible, n_sel, _kth_largest(rank, eligible, tl.maximum(n_sel, 1), 0, STEPS))
        tl.store(idx_ptr + row * K + at, ls.to(tl.int64), mask=take & (n_sel > 0))
        tl.store(nsel_ptr + row, n_sel.to(tl.int64))

    @triton.jit
    def _row_topk_kernel(scores_ptr, top_ptr, idx_ptr, rows_ptr, ends_ptr, per_user, end_lo, end_hi,
                         CAP: tl.constexpr, CAP_P2: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr,
                         SOFTMAX: tl.constexpr, FILL: tl.constexpr):
        """Row p of scores (CAP,) fp32 → its K largest (equal scores: later positions first) in position order:
        the order-preserving int32 of each score, its K-th largest by :func:`_score_threshold`, then a
        compaction. SOFTMAX: their softmax weights instead, over the selected positions < rows[p // per_user]
        (0 elsewhere), computed on the K stored values read back (exp over K, not over the row). Rows of users
        (p // per_user) whose record ends outside (end_lo, end_hi] are another launch's."""
        p = tl.program_id(0).to(tl.int64)
        if _serves(ends_ptr, p // per_user, end_lo, end_hi):
            _topk_row(scores_ptr, top_ptr, idx_ptr, rows_ptr, per_user, p, CAP, CAP_P2, K, K_P2, SOFTMAX, FILL)

    @triton.jit
    def _topk_row(scores_ptr, top_ptr, idx_ptr, rows_ptr, per_user, p, CAP: tl.constexpr, CAP_P2: tl.constexpr,
                  K: tl.constexpr, K_P2: tl.constexpr, SOFTMAX: tl.constexpr, FILL: tl.constexpr):
        """The top-k of row p: the kernel above."""
        ls = tl.arange(0, CAP_P2)
        valid = ls < CAP
        x = tl.load(scores_ptr + p * CAP + ls, mask=valid, other=0.0) + 0.0  # -0.0 ranks as 0.0
        order = tl.where(valid, _flip(x.to(tl.int32, bitcast=True)), -(1 << 31))  # int32 order == float order
        take, at = _take_top(order, valid, K, _score_threshold(order, K, FILL, 12))
        top_row, idx_row = top_ptr + p * K, idx_ptr + p * K
        tl.store(top_row + at, x, mask=take)
        tl.store(idx_row + at, ls.to(tl.int64), mask=take)
        if SOFTMAX:  # over the K stored, read back: a user's real scores (positions < its rows) get the weights
            tl.debug_barrier()  # the values just stored, read back by other threads
            js = tl.arange(0, K_P2)
            real = (js < K) & (tl.load(idx_row + js, mask=js < K, other=CAP) < tl.load(rows_ptr + p // per_user))
            v = tl.load(top_row + js, mask=real, other=0.0)
            e = tl.where(real, tl.exp(v - tl.max(tl.where(real, v, -float("inf")), axis=0)), 0.0)
            tl.store(top_row + js, e / tl.maximum(tl.sum(e, axis=0), 1e-30), mask=js < K)  # all 0 without rows


def row_topk(scores: torch.Tensor, k: int, num_warps: int = 1, *, softmax_rows: torch.Tensor | None = None,
             n_cand: int = 1, ends: torch.Tensor | None = None, chunk: tuple[int, int] = ALL_BYTES[0],
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of ``scores`` (..., cap) fp32, equal scores later position first (the set of
    ``scores.flip(-1).sort(descending=True, stable=True)``'s first k), **in position order**, as (values (..., k)
    fp32, positions (..., k) int64): one program per row, a binary search for the k-th largest in registers
    (cap ≤ 4,096). Position order puts a user's real scores before group_scores' fill past its rows.
    ``softmax_rows`` (B,) (TWIN: scores (B·C, H, cap), user b = row // (H·n_cand)): the values are replaced by
    ``model.attention.masked_softmax`` of them over each user's first min(rows[b], k), computed in the kernel.
    ``ends`` (B,) with ``chunk`` (lo, hi] (with softmax_rows): only the rows of users whose record ends in it are
    written, into ``out`` = (values, positions) when given (a copy piece's launch)."""
    cap = scores.shape[-1]
    if not 1 <= k <= cap <= 4096:
        raise ValueError(f"row_topk takes 1 <= k <= cap <= 4096, got k {k}, cap {cap}")
    softmax = softmax_rows is not None
    if softmax and scores.dim() != 3:
        raise ValueError(f"row_topk's softmax takes scores (B·C, H, cap), got {tuple(scores.shape)}")
    if ends is not None and not softmax:
        raise ValueError("row_topk reads the users' record ends with softmax_rows only")
    flat = scores.reshape(-1, cap).contiguous()  # (rows, cap)
    top, idx = out if out is not None else (torch.empty(flat.shape[0], k, dtype=torch.float32, device=scores.device),
                                            torch.empty(flat.shape[0], k, dtype=torch.int64, device=scores.device))
    per_user = max(1, flat.shape[0] // max(1, scores.shape[0]) * n_cand) if softmax else 1  # score rows per user
    ends = served_ends(ends, softmax_rows if softmax else torch.zeros(flat.shape[0], dtype=torch.int64,
                                                                      device=scores.device), chunk)
    if flat.shape[0]:
        _row_topk_kernel[(flat.shape[0],)](flat, top, idx, softmax_rows if softmax else idx, ends, per_user,
                                           chunk[0], chunk[1], CAP=cap,
                                           CAP_P2=triton.next_power_of_2(cap), K=k,
                                           K_P2=triton.next_power_of_2(k), SOFTMAX=softmax,
                                           FILL=_FILL_ORDER, num_warps=num_warps)
    return top.reshape(*scores.shape[:-1], k), idx.reshape(*scores.shape[:-1], k)


def key_select(raw: torch.Tensor, key_starts: torch.Tensor, rows: torch.Tensor, cap: int, key_bytes: int, bits: int,
               targets: torch.Tensor, hamming: bool, k: int, num_warps: int = 1, codes: torch.Tensor | None = None,
               ends: torch.Tensor | None = None, chunk: tuple[int, int] = ALL_BYTES[0],
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SIM's / ETA's retrieval in one kernel: for candidate r of user b = r // C (targets (B, C) int64 keys; row
    l's key read at ``key_starts[b] + l·key_bytes``, ``rows`` (B,) valid) every row's rank — ``hamming`` (ETA)
    (bits - Hamming distance)·cap + l, else (SIM) shared categories·cap + l for rows sharing one or more — and the
    positions of the ``k`` largest (every eligible row if fewer) in position order: (sel (R, k) int64, n_sel (R,)
    int64 = min(eligible rows, k)), ``model.retrieval``'s selection; entries past n_sel are unspecified. ``codes``
    (M,) int64: row l's key is ``codes[i]``, i its router index read ``key_bytes`` wide at the same place (SIM / ETA
    keyed by their pool rows, ``model.longseq.SIM.pool_codes`` / ``ETA.pool_codes``). ``ends`` (B,) one past each
    user's record with ``chunk`` (lo, hi]: only the rows of users whose record ends in it are written, into ``out`` =
    (sel, n_sel) when given (a copy piece's launch)."""
    b, c = targets.shape
    if not 1 <= k <= max(1, cap) <= 4096 or bits > 62:
        raise ValueError(f"key_select takes 1 <= k <= cap <= 4096 and keys of <= 62 bits, got k {k}, cap {cap}, "
                         f"{bits} bits")
    sel, n_sel = out if out is not None else (torch.zeros(b * c, k, dtype=torch.int64, device=targets.device),
                                              torch.zeros(b * c, dtype=torch.int64, device=targets.device))
    # sel (R, k), n_sel (R,)
    ends = served_ends(ends, rows, chunk)
    if b * c:
        _key_select_kernel[(b * c,)](
            raw, key_starts, rows, ends, targets.contiguous(), sel, n_sel, sel if codes is None else codes, c,
            0 if codes is None else codes.shape[0], chunk[0], chunk[1], KEY_BYTES=key_bytes, BITS=bits, HAMMING=hamming,
            CAP=max(1, cap), CAP_P2=triton.next_power_of_2(max(1, cap)), K=k,
            STEPS=((bits + 1) * max(1, cap) - 1).bit_length(), FROM_IDX=codes is not None, num_warps=num_warps,
        )
    return sel, n_sel
