"""Hard routing of a batch over a wide router without writing its logits (Triton): argmax_c x·w_c.

HSTU's candidates pick, per layer and side, the pool row of their router's largest logit
(``model.routing.route(linear(h, W))``: h (N, E) against W (M, E), M = the pool's 10,000 rows). As torch ops that
is an fp32 FMA GEMM writing (N, M) logits and a max reading them back: 20 MB each way per call at N 512, on the
request's critical path from the second layer on. :func:`route_rows` finds the same columns in two launches:

    scan  program (i, s) — rows i·BM .., columns s·SPAN .. (s + 1)·SPAN - 1, BN at a time:
            a[r, c] = x[r] · w[c] on tensor cores at ``tf32x3`` (each fp32 operand split into two tf32 halves,
            three products); each lane (row, column mod BN) keeps its best (value, column) and runner-up value
            elementwise, and at the span's end a row keeps its two largest (value, column) and a bound on the rest
            (the third lane best or the largest runner-up)
    pick  program r — A = the largest a[r, ·] over the spans, T = A - 2·margin(r):
            every kept column with a >= T is rescored in IEEE fp32 (x · w_c summed on the CUDA cores) and the
            largest exact logit wins, ties to the lowest column (torch's max); where a span's bound on the rest
            reaches T (a column not kept could win; two contenders in one lane land here) the row is rescored whole

margin(r) = (2E + 8)·2⁻²² · Σ_e |x[r, e]| · max_c |w[c, e]| bounds |a[r, c] - fp32 logit| for every column c
(tf32x3's dropped low·low product, the halves' roundings and the tensor cores' truncation of the low halves, a few
2⁻²², covered by the 8; truncating fp32 accumulations of 3E products, 1.5E·2⁻²²; the IEEE rescore's own E·2⁻²⁴): a
column whose a is below T has an fp32 logit below the winner's, so the pick is the fp32 argmax up to the summation
order of the rescore's E-term sums — the freedom any fp32 GEMM has. With N(0, 1/E) routers a second column falls
within 2·margin of the best for well under 1% of rows (then both are rescored); a third in one span, or two in one
lane, practically never. Where T is not a number (a NaN input, or logits overflowing to ±inf) the row is rescored
whole, and its index is always a column of the router. Under Triton's interpreter ``tf32x3`` runs as fp32 and the
same code paths run (``tests/cachestore/decode/test_fused_route.py`` checks ties, near-ties and the full rescore
against ``route``).
"""

from __future__ import annotations

import torch

from collectivekv.cachestore.decode.fused import triton

SCAN_BN = 64  # router columns per tensor-core step (E 64: 0.018 ms for 512 rows, 0.026 at 128; zoo_launch_sweep.py)
PICK_BN = 64  # router columns per step of the full IEEE rescore
TARGET_PROGRAMS = 264  # scan programs aimed at (two per SM of an H100 / H200)
TILE_CELLS = 8192  # fp32 cells of the scan's x tile and of its router tile, at most
MAX_WIDTH = 512  # the widest router (E) whose scan fits in shared memory (wider: route the logits in torch)
SCAN_WARPS = 4  # warps per scan program (one warpgroup: a 64-row tile per tensor-core instruction)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _pop_best(v, c):
        """Per row of v (BM, BN) at columns c: the largest value, its lowest column, and v with that column's entries
        set to -inf."""
        m = tl.max(v, axis=1)
        a = tl.min(tl.where(v == m[:, None], c, 2147483647), axis=1)
        return m, a, tl.where(c == a[:, None], float("-inf"), v)

    @triton.jit
    def _span_top(v1, c1, v2):
        """Per row the two largest (value, column) over the lanes' bests v1 (BM, BN) at columns c1, and a bound on
        every other value of the span: the third lane best or the largest lane runner-up v2 (whose column is not
        kept), whichever is larger. Equal values rank by the lower column."""
        m1, a1, v1 = _pop_best(v1, c1)
        m2, a2, v1 = _pop_best(v1, c1)
        return m1, a1, m2, a2, tl.maximum(tl.max(v1, axis=1), tl.max(v2, axis=1))

    @triton.jit
    def _route_scan_kernel(x_ptr, w_ptr, val_ptr, col_ptr, n_rows, N_COLS: tl.constexpr, SPAN: tl.constexpr,
                           E: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           PRECISION: tl.constexpr):
        """Program (i, s): rows i·BM .., columns s·SPAN .. (whole BN steps); writes val (N, S, 3) and col (N, S, 2).
        Each lane (row, column mod BN) keeps its best (value, column) and runner-up value over the steps, elementwise
        (steps visit columns in order: a strict > keeps the lower column on equal values); one reduction per span."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,)
        span = tl.program_id(1)
        es = tl.arange(0, BE)  # (BE,) BE = E rounded up to a power of two >= 16
        rmask = rows < n_rows
        x = tl.load(x_ptr + rows[:, None] * E + es[None, :], mask=rmask[:, None] & (es < E)[None, :], other=0.0)
        v1 = tl.full([BM, BN], float("-inf"), tl.float32)  # (BM, BN) per lane: the best, its column, the runner-up
        v2 = v1
        c1 = tl.zeros([BM, BN], dtype=tl.int32) + span * SPAN  # a column of the span (each holds a valid one)
        for j in range(0, SPAN, BN):
            cols = span * SPAN + j + tl.arange(0, BN)  # (BN,)
            valid = cols < N_COLS
            w = tl.load(w_ptr + cols[None, :] * E + es[:, None], mask=valid[None, :] & (es < E)[:, None],
                        other=0.0)  # (BE, BN): columns of Wᵀ
            s = tl.where(valid[None, :], tl.dot(x, w, input_precision=PRECISION), float("-inf"))  # (BM, BN) fp32
            up = s > v1
            v2 = tl.where(up, v1, tl.maximum(v2, s))
            c1 = tl.where(up, cols[None, :], c1)
            v1 = tl.where(up, s, v1)
        m1, a1, m2, a2, m3 = _span_top(v1, c1, v2)
        out = rows * tl.num_programs(1) + span  # (BM,) the (row, span) slot
        tl.store(val_ptr + out * 3, m1, mask=rmask)
        tl.store(val_ptr + out * 3 + 1, m2, mask=rmask)
        tl.store(val_ptr + out * 3 + 2, m3, mask=rmask)
        tl.store(col_ptr + out * 2, a1, mask=rmask)
        tl.store(col_ptr + out * 2 + 1, a2, mask=rmask)

    @triton.jit
    def _exact_best(w_ptr, cols, keep, x, es, E: tl.constexpr):
        """The largest IEEE fp32 logit x · w_c over columns ``cols`` where ``keep`` and its lowest column
        (-inf and 2^31 - 1 where none is kept)."""
        w = tl.load(w_ptr + cols[:, None] * E + es[None, :], mask=keep[:, None] & (es < E)[None, :], other=0.0)
        e = tl.where(keep, tl.sum(w * x[None, :], axis=1), float("-inf"))
        best = tl.max(e, axis=0)
        return best, tl.min(tl.where(keep & (e == best), cols, 2147483647), axis=0)

    @triton.jit
    def _route_pick_kernel(x_ptr, w_ptr, wmax_ptr, val_ptr, col_ptr, idx_ptr, S, tol, N_COLS: tl.constexpr,
                           E: tl.constexpr, BE: tl.constexpr, SP2: tl.constexpr, BN: tl.constexpr):
        """Program r: row r's column from its spans' kept values (module docstring); idx (N,) int64."""
        r = tl.program_id(0)
        es = tl.arange(0, BE)
        x = tl.load(x_ptr + r * E + es, mask=es < E, other=0.0)  # (BE,)
        margin = tol * tl.sum(tl.abs(x) * tl.load(wmax_ptr + es, mask=es < E, other=0.0), axis=0)
        sp = tl.arange(0, SP2)
        smask = sp < S
        slot = r * S + sp  # (SP2,)
        a1 = tl.load(val_ptr + slot * 3, mask=smask, other=float("-inf"))
        a2 = tl.load(val_ptr + slot * 3 + 1, mask=smask, other=float("-inf"))
        a3 = tl.load(val_ptr + slot * 3 + 2, mask=smask, other=float("-inf"))
        reach = tl.max(a1, axis=0) - 2.0 * margin
        b1, k1 = _exact_best(w_ptr, tl.load(col_ptr + slot * 2, mask=smask, other=0), smask & (a1 >= reach), x, es, E)
        b2, k2 = _exact_best(w_ptr, tl.load(col_ptr + slot * 2 + 1, mask=smask, other=0), smask & (a2 >= reach), x,
                             es, E)
        best = tl.maximum(b1, b2)
        at = tl.minimum(tl.where(b1 == best, k1, 2147483647), tl.where(b2 == best, k2, 2147483647))
        # a span holds a third contender, or the bound is not a number (a NaN input, or logits overflowing to inf):
        # rescore every column
        if (tl.max(a3, axis=0) >= reach) | (reach != reach):
            best = tl.full([], float("-inf"), tl.float32)
            at = at * 0
            for j in range(0, N_COLS, BN):
                cols = j + tl.arange(0, BN)
                tb, tk = _exact_best(w_ptr, cols, cols < N_COLS, x, es, E)
                at = tl.where(tb > best, tk, at)
                best = tl.maximum(best, tb)
        tl.store(idx_ptr + r, tl.minimum(tl.maximum(at, 0), N_COLS - 1).to(tl.int64))  # a NaN row: a column


def router_bound(weight: torch.Tensor) -> torch.Tensor:
    """(E,) fp32 max over the router's columns of |w[c, e]| (weight (M, E)): the margin's factor, computed once
    per router (:func:`route_rows`' ``wmax``)."""
    return weight.detach().abs().amax(dim=0).float().contiguous()


def padded_width(width: int) -> int:
    """BE: the router width E rounded up to a power of two, at least 16 (``tl.dot``'s smallest inner size)."""
    return max(16, 1 << max(0, width - 1).bit_length())


def scan_shape(n_rows: int, n_cols: int, width: int) -> tuple[int, int, int, int]:
    """(BM, BN, spans, SPAN) of the scan for N rows and M columns of ``width`` E (padded to BE, a power of two):
    16-64 rows per program and BN columns a step (``SCAN_BN`` at most), each tile of x (BM × BE) and of the router
    (BE × BN) at most ``TILE_CELLS`` fp32 so that the scan's shared memory fits an H100's (checked by compiling for
    sm_90 up to E 512); spans of whole BN steps sized so that about ``TARGET_PROGRAMS`` programs run."""
    be = padded_width(width)
    if be > MAX_WIDTH:
        raise ValueError(f"route_rows: routers of width E <= {MAX_WIDTH}, got {width}")
    bm = max(16, min(16 if n_rows <= 16 else 32 if n_rows <= 32 else 64, TILE_CELLS // be))
    bn = max(16, min(SCAN_BN, TILE_CELLS // be))
    steps = -(-n_cols // bn)
    blocks = -(-n_rows // bm)
    per_span = max(1, -(-steps * blocks // TARGET_PROGRAMS))  # BN steps per span
    return bm, bn, -(-steps // per_span), per_span * bn


def route_rows(x: torch.Tensor, weight: torch.Tensor, wmax: torch.Tensor | None = None, *,
               precision: str = "tf32x3") -> torch.Tensor:
    """(N,) int64 argmax over columns of x (N, E) · weight (M, E)ᵀ, both fp32 on one device, as
    ``model.routing.route(linear(x, weight)).idx`` (module docstring): ties to the lowest column; a row whose logits
    hold a NaN gets some valid column.
    wmax: :func:`router_bound` of ``weight`` (computed here when None; pass it to stay free of extra launches
    inside a CUDA graph). ``precision`` "ieee" scans on the CUDA cores (the margin then bounds summation order
    only). No host syncs."""
    n, e = x.shape
    m = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != e or m == 0:
        raise ValueError(f"route_rows: x {tuple(x.shape)} against a router of shape {tuple(weight.shape)}")
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return idx
    x = x.float().contiguous()
    weight = weight.float().contiguous()
    wmax = router_bound(weight) if wmax is None else wmax
    bm, bn, spans, span = scan_shape(n, m, e)
    be = padded_width(e)
    vals = torch.empty(n, spans, 3, dtype=torch.float32, device=x.device)  # (N, S, 3) per span: 3 largest
    cols = torch.empty(n, spans, 2, dtype=torch.int32, device=x.device)  # (N, S, 2) their columns (2 kept)
    _route_scan_kernel[(-(-n // bm), spans)](x, weight, vals, cols, n, N_COLS=m, SPAN=span, E=e, BE=be, BM=bm, BN=bn,
                                             PRECISION=precision, num_warps=SCAN_WARPS)
    tol = (2 * e + 8) * 2.0**-22
    _route_pick_kernel[(n,)](x, weight, wmax, vals, cols, idx, spans, tol, N_COLS=m, E=e, BE=be,
                             SP2=max(2, triton.next_power_of_2(spans)), BN=PICK_BN, num_warps=2)
    return idx
