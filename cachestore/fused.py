"""Fused collective target attention straight from the packed batch bytes (Triton; din records).

The eager serving path (:func:`cachestore.transfer.unpack_entry` + :func:`cachestore.decode.decode`) turns the
jagged records into padded (B, L, ·) tensors, casts them, then either materialises K/V or scores the
whole pool per user. At the paper's shape (B 512, L 1000, d_a 256, 8 heads, pool 10,000) that is
~1 ms of GPU work even inside a CUDA graph, 10× the PCIe floor of the bytes it decodes. This module
replaces unpack + attention with ONE kernel that reads the device copy of the packed batch as it is:

    program (b·C + c, g, s) — user b, candidate c, heads g·GH .. g·GH + GH - 1 (GH = heads_per_program),
      behaviours of part s (of S; S = 1 unless the launch has few programs: FusedConfig.split_l);
      for each of its heads h: dh = d_a / H, cols = h·dh .. h·dh + dh - 1
      record r = raw[offsets[b]:], n = lengths[b] (the batch header: int64 offsets (B,), lengths (B,))
      payload = r[32:]: k_user (n, dk) | v_user (n, dv) | k_idx (n,) | v_idx (n,)   (cachestore.record)
      for blocks of BLOCK_L behaviours l < n (online softmax, fp32 accumulation):
          key_l = user_k[l, cols] (0 beyond dk) + P_k[k_idx[l], cols]   (pool rows zero in the user dims)
          s_l   = q[b, c, cols] · key_l / sqrt(dh)
          val_l = user_v[l, cols] (0 beyond dv) + P_v[v_idx[l], cols]
      out[b, c, cols] = Σ softmax(s)_l val_l        (zeros when n == 0)
      (S > 1: each part stores its running max, denominator and sum; a second kernel combines the parts)

so K/V = concat(user part, pool row) exactly as ``model.cache.rebuild_kv`` builds them, never written
to memory: the kernel reads each behaviour's few user-part bytes and index from the batch and two
dh-wide pool rows (the pools, 2 × pool × d_a × 2 or 4 bytes, stay in L2). Pool rows are read at the
store's precision unless ``FusedConfig.pool_dtype`` says otherwise (:func:`pool_dtype`); stored user
parts and pool rows are cast to fp32 on load and everything after is fp32; indices are read as 16-bit
halves, so int32 indices need no 4-byte alignment. Without shared K/V (``mode`` full, or the unshared
side) the user part is the whole d_a row. The plain-PyTorch reference is the eager path;
``tests/test_fused.py`` checks the two agree on CUDA, and under Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU.

A launch may serve only the users whose records end in a byte range (``chunks``): the CUDA graph copies
the batch in pieces and launches the kernel once per piece as it lands (:mod:`cachestore.graphs`).

Measured on an H100 (``benchmarks/decode_latency.py``, B 512, L 1000): one CUDA-graph replay of the
copies + q projection + this kernel + MLP takes 0.171 ms with the fp16 store and pool rows and 0.245 ms
with fp32 throughout, the copy in 3 pieces beside the kernel (``benchmarks/results/decode_latency.json``,
``decode_latency_fp32.json``), against 1.25 ms for a CUDA graph over unpack + poolscore
(``docs/serving.md``, "GPU results");
splitting histories halved the replay at B 1–64 (``decode_latency_launch3_float{16,32}.json``).
The pool-row reads bound the kernel: at B 512, L 1000 they are 1.05 GB with fp32 rows (a kernel doing
only them: 0.151 ms, 7.0 TB/s from L2) and 0.52 GB with fp16 rows (0.092 ms;
``benchmarks/results/fused_kernel_floor.json``) — with fp32 rows 1.6× the PCIe floor of the fp16 batch
by themselves, which is why the pool rows follow the store's precision by default. Timed alone from
Python (launch cost included), the kernel takes 1.4× (fp32 pools) to 2.3× (fp16) the time of that
read-only kernel; Nsight Compute: ``benchmarks/results/ncu_fused_B512_L1000.txt``. ``raw`` may also be
a pinned host batch, which the kernel then reads over PCIe (mapped, zero-copy) — measured slower than copying first.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cachestore.decode import ResidentModel
from cachestore.entry import EntryLayout
from cachestore.record import HEADER_SIZE, RouterIndexError
from cachestore.transfer import KV_TORCH

try:  # Triton is optional: CUDA machines have it; CPU machines may run its interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

FUSED = "fused"  # the decode path name of this kernel (graphs, runtime, ckv score)
KV_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}
IDX_BYTES = {None: 0, "uint16": 2, "int32": 4}
STORE = "store"  # FusedConfig.pool_dtype: read the pool rows at the store's kv dtype


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import, as here


@dataclass(frozen=True)
class FusedConfig:
    """Launch settings of the fused kernel (derive variants with ``dataclasses.replace``).

    block_l: behaviours per online-softmax step; num_warps; heads_per_program: heads one program
    handles (a power of two dividing H; they share each behaviour's index and user-part loads);
    num_stages: Triton's software-pipelining depth of the behaviour loop (None: Triton's default);
    split_l: parts each user's history is split into, one program each, their softmax states combined by
    a second kernel (flash-decoding; a power of two; None: :func:`split_parts` picks from the launch size);
    pool_dtype: the precision of the pool rows the kernel reads — "store" (default): the store's ``kv_dtype``,
    so both parts of each K/V row have the precision the store was written at (an fp16 store, the default,
    reads fp16 pool rows: half the pool reads of fp32, the bound of the kernel, see the module docstring;
    an fp32 store reads the model's rows exactly); "float32" (exact whatever the store), "float16" or
    "bfloat16" to override. The defaults (BLOCK_L 16, 1 warp, 2 heads
    per program, auto split) are the fastest setting timed inside the serving graph on an H100
    (``benchmarks/decode_latency.py --compare-launch``, round-robin at L 1000, B 64/256/512, fp32 and fp16
    pools: ``benchmarks/results/decode_latency_launch{,2,3}_float{16,32}.json``): at B 512 0.174 ms (fp16
    pools) and 0.244 ms (fp32) against 0.206 and 0.267 ms for BLOCK_L 32, 2 warps, 2 parts.
    The kernel timed alone from Python (``benchmarks/fused_kernel.py``) includes each launch's CPU cost,
    which the graph does not pay, so tune in the graph.
    """

    block_l: int = 16
    num_warps: int = 1
    heads_per_program: int = 2
    num_stages: int | None = None
    split_l: int | None = None
    pool_dtype: str = STORE

    def __post_init__(self) -> None:
        if self.pool_dtype != STORE and self.pool_dtype not in KV_TORCH:
            raise ValueError(f"pool_dtype must be one of {[STORE, *sorted(KV_TORCH)]}, got {self.pool_dtype!r}")
        for name in ("block_l", "num_warps", "heads_per_program"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.split_l is not None and (self.split_l < 1 or self.split_l & (self.split_l - 1)):
            raise ValueError(f"split_l must be a power of two, got {self.split_l}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_FUSED = FusedConfig()


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
        """(BLOCK_L, W) fp32 user part of behaviours ``ls`` at columns ``cols`` (W,) (0 for cols >= WIDTH)."""
        if KV_CODE == 0:
            ptr = (raw_ptr + base).to(tl.pointer_type(tl.float16))
        elif KV_CODE == 1:
            ptr = (raw_ptr + base).to(tl.pointer_type(tl.bfloat16))
        else:
            ptr = (raw_ptr + base).to(tl.pointer_type(tl.float32))
        mask = lmask[:, None] & (cols[None, :] < WIDTH)
        return tl.load(ptr + ls[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _attend_block(
        raw_ptr, pool_k_ptr, pool_v_ptr, start, n, stop, kidx_base, vidx_base, l0, q, cols, m_i, l_i, acc, nbad,
        pool_size, D_A: tl.constexpr, GH: tl.constexpr, DH: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, KV_CODE: tl.constexpr, KV_BYTES: tl.constexpr,
        IDX_BYTES: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """One online-softmax step of GH heads over behaviours l0 .. l0 + BLOCK_L - 1 (masked at l >= stop;
        stop <= n, the user's length, which places the V part). q, cols: (GH·DH,); m_i, l_i: (GH,);
        acc: (GH, DH); nbad: router indices outside 0 .. pool_size - 1 seen so far (their pool loads are
        masked: never a read outside the pool)."""
        ls = l0 + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
        lmask = ls < stop
        key = _load_user(raw_ptr, start, ls, cols, lmask, DK, KV_CODE)  # (BLOCK_L, GH·DH)
        if K_SHARED:
            ik = _load_idx(raw_ptr, kidx_base, ls, lmask, IDX_BYTES)
            inside = (ik >= 0) & (ik < pool_size)
            nbad += tl.sum((lmask & (ik < 0)).to(tl.int32) + (lmask & (ik >= pool_size)).to(tl.int32), axis=0)
            key += tl.load(pool_k_ptr + ik[:, None] * D_A + cols[None, :], mask=(lmask & inside)[:, None],
                           other=0.0).to(tl.float32)
        s = tl.sum(tl.reshape(key * q[None, :], (BLOCK_L, GH, DH)), axis=2)  # (BLOCK_L, GH)
        s = tl.where(lmask[:, None], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # (GH,)
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # an all-masked block (static bound)
        alpha = tl.exp(m_i - m_ref)  # (GH,)
        p = tl.exp(s - m_ref[None, :])  # (BLOCK_L, GH), 0 at masked positions
        val = _load_user(raw_ptr, start + n * DK * KV_BYTES, ls, cols, lmask, DV, KV_CODE)  # (BLOCK_L, GH·DH)
        if V_SHARED:
            iv = _load_idx(raw_ptr, vidx_base, ls, lmask, IDX_BYTES)
            inside = (iv >= 0) & (iv < pool_size)
            nbad += tl.sum((lmask & (iv < 0)).to(tl.int32) + (lmask & (iv >= pool_size)).to(tl.int32), axis=0)
            val += tl.load(pool_v_ptr + iv[:, None] * D_A + cols[None, :], mask=(lmask & inside)[:, None],
                           other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        pv = p[:, :, None] * tl.reshape(val, (BLOCK_L, GH, DH))  # (BLOCK_L, GH, DH)
        acc = acc * alpha[:, None] + tl.sum(pv, axis=0)  # (GH, DH)
        return m_new, l_i, acc, nbad

    @triton.jit
    def _collective_attention_kernel(
        raw_ptr, header_ptr, q_ptr, pool_k_ptr, pool_v_ptr, out_ptr, m_ptr, l_ptr, flag_ptr, n_users, n_cand, scale,
        end_lo, end_hi, pool_size, D_A: tl.constexpr, GH: tl.constexpr, DH: tl.constexpr, DK: tl.constexpr,
        DV: tl.constexpr,
        K_SHARED: tl.constexpr, V_SHARED: tl.constexpr, KV_CODE: tl.constexpr, KV_BYTES: tl.constexpr,
        IDX_BYTES: tl.constexpr, HEADER: tl.constexpr, BLOCK_L: tl.constexpr, MAX_L: tl.constexpr,
        SPLIT: tl.constexpr, SEG: tl.constexpr,
    ):
        row = tl.program_id(0)  # b·C + c: rows of q and out
        group = tl.program_id(1)  # heads group·GH .. group·GH + GH - 1
        part = tl.program_id(2)  # behaviours part·SEG .. part·SEG + SEG - 1 (SPLIT parts)
        b = row // n_cand  # the user in the batch
        start = tl.load(header_ptr + b) + HEADER  # payload byte offset of user b's record
        n = tl.load(header_ptr + n_users + b)  # behaviours of user b
        kidx_base = start + n * (DK + DV) * KV_BYTES
        vidx_base = kidx_base + n * (IDX_BYTES if K_SHARED else 0)
        end = vidx_base + n * (IDX_BYTES if V_SHARED else 0)  # one past the record's last byte
        mine = (end > end_lo) & (end <= end_hi)  # this launch serves the users whose records end in its chunk
        lo = part * SEG
        stop = tl.where(mine, tl.minimum(n, lo + SEG), lo)  # no behaviours for another launch's users
        cols = group * GH * DH + tl.arange(0, GH * DH)  # (GH·DH,) this group's columns of d_a
        q = tl.load(q_ptr + row * D_A + cols).to(tl.float32) * scale  # (GH·DH,)
        m_i = tl.full([GH], -float("inf"), tl.float32)  # running max per head
        l_i = tl.zeros([GH], dtype=tl.float32)  # running denominator per head
        acc = tl.zeros([GH, DH], dtype=tl.float32)
        nbad = tl.zeros([], dtype=tl.int32)  # router indices outside the pool (loads masked)
        if MAX_L > 0:  # Triton's CPU interpreter cannot loop to a loaded bound: static bound, masked
            for l0 in range(0, MAX_L, BLOCK_L):
                m_i, l_i, acc, nbad = _attend_block(
                    raw_ptr, pool_k_ptr, pool_v_ptr, start, n, stop, kidx_base, vidx_base, lo + l0, q, cols, m_i, l_i,
                    acc, nbad, pool_size, D_A, GH, DH, DK, DV, K_SHARED, V_SHARED, KV_CODE, KV_BYTES, IDX_BYTES,
                    BLOCK_L)
        else:
            for l0 in range(lo, stop, BLOCK_L):
                m_i, l_i, acc, nbad = _attend_block(
                    raw_ptr, pool_k_ptr, pool_v_ptr, start, n, stop, kidx_base, vidx_base, l0, q, cols, m_i, l_i,
                    acc, nbad, pool_size, D_A, GH, DH, DK, DV, K_SHARED, V_SHARED, KV_CODE, KV_BYTES, IDX_BYTES,
                    BLOCK_L)
        tl.store(flag_ptr + b, 1, mask=mine & (nbad > 0))  # the runtime raises after the batch, naming the user
        if SPLIT == 1:
            out = acc / tl.maximum(l_i, 1e-30)[:, None]  # (GH, DH); l_i == 0 only when n == 0, where acc == 0
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


# split_parts' budget of programs per SM: with the 1-warp default launch, 64 (two waves of an H100 SM's 32
# resident blocks) was fastest inside the serving graph at B 64-512, L 1000 (8 parts at B 512 against 2 under
# a budget of 16: benchmarks/results/decode_latency_launch3_float{16,32}.json)
PROGRAMS_PER_SM = 64


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_parts(config: FusedConfig, rows: int, groups: int, max_len: int, device: torch.device) -> int:
    """Parts each user's behaviours are split into (one program each, combined after): ``config.split_l``,
    or for None the largest power of two that keeps rows · groups · parts within PROGRAMS_PER_SM per SM
    (the kernel walks its behaviours serially: with few users, few programs would each take the whole
    history's latency) and parts at least 2 blocks long."""
    if config.split_l is not None:
        return config.split_l
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    parts = 1
    while parts * 2 * rows * groups <= PROGRAMS_PER_SM * sms and parts * 2 * 2 * config.block_l <= max_len:
        parts *= 2
    return parts


def padded_pools(resident: ResidentModel, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_k, P_v) as (pool, d_a) rows zero in the user dims (the kernel adds the user part there), at
    ``dtype`` (float32: the model's rows exactly; float16/bfloat16 halve the kernel's pool reads at the
    cost of rounding the pool); a 1-row zero tensor for a side that is not shared. Cached per dtype."""
    cache: dict = resident.__dict__.setdefault("_fused_pools", {})
    if dtype not in cache:
        def rows(per_head: torch.Tensor | None, transposed: bool) -> torch.Tensor:
            if per_head is None:
                return torch.zeros(1, resident.cfg.d_attn, dtype=dtype, device=resident.device)
            heads = per_head.permute(2, 0, 1) if transposed else per_head.permute(1, 0, 2)  # (M, H, dh)
            return heads.reshape(heads.shape[0], -1).to(dtype).contiguous()  # (M, d_a)
        cache[dtype] = (rows(resident.pool_k, True), rows(resident.pool_v, False))
    return cache[dtype]


def pool_dtype(config: FusedConfig, layout: EntryLayout) -> str:
    """The pool-row precision a launch with ``config`` reads for a store of ``layout``: ``config.pool_dtype``,
    or the store's kv_dtype where that is "store"."""
    return layout.kv_dtype if config.pool_dtype == STORE else config.pool_dtype


ALL_BYTES = ((-1, 1 << 62),)  # one launch for every user (record ends in (-1, 2^62])


def fused_attention(raw: torch.Tensor, q: torch.Tensor, resident: ResidentModel, layout: EntryLayout,
                    n_users: int, *, config: FusedConfig = DEFAULT_FUSED,
                    chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                    on_chunk: Callable[[int], None] | None = None, flags: torch.Tensor | None = None) -> torch.Tensor:
    """Target attention (b, C, d_a) fp32 of ``q`` (b, C, d_a) for users 0 .. b - 1 (b <= n_users) of the
    packed batch ``raw`` of ``n_users`` users (uint8, header at 0: :mod:`cachestore.batch`) on q's device,
    or for a CUDA q in pinned host memory: the kernel then reads the batch over PCIe as it goes (mapped,
    zero-copy: no separate host-to-device copy; the host buffer must not be refilled before it finishes)
    — the module docstring's kernel, launched with
    ``config`` (:class:`FusedConfig`). Equals ``decode``'s attention on ``unpack(raw, ...)`` up to fp32
    summation order where it reads fp32 pool rows (an fp32 store, or ``pool_dtype="float32"``); otherwise
    up to the rounding of the pool rows to the store's (or ``pool_dtype``'s) precision.

    ``chunks``: one kernel launch per (lo, hi] byte range, serving the users whose records end in it (the
    ranges partition (-1, 2^62]; the batch header must be readable from the first launch on), each after
    ``on_chunk(index)`` — the hook a caller copying the batch in those chunks on another stream uses to
    make launch c wait for chunk c, or to issue it on a stream of its own (:class:`cachestore.graphs.GraphedDecoder`
    with ``overlap``) — and once more as ``on_chunk(len(chunks))`` after the last launch, where that caller
    joins its streams. A history split into parts has its parts combined once, after that.

    ``flags`` ((n_users,) int32 on q's device): the kernel sets ``flags[b] = 1`` for a user with a router
    index outside the pool (those pool loads are masked, never read out of bounds); the caller raises after
    the batch. Without ``flags``: a ``RouterIndexError`` naming the batch row, after a host sync."""
    if triton is None:
        raise RuntimeError("the fused decode needs Triton (pip install triton), or use the eager path")
    g = layout.flat_group  # the din group: k_user (n, dk) | v_user (n, dv) | k_idx (n,) | v_idx (n,)
    if g is None:
        raise ValueError("the fused decode reads din batches only")
    cfg = resident.cfg
    b, c, d_a = q.shape
    if b > n_users or d_a != cfg.d_attn:
        raise ValueError(f"q {tuple(q.shape)} does not match a batch of {n_users} users × d_a {cfg.d_attn}")
    heads = resident.n_heads
    dh = d_a // heads
    if dh & (dh - 1):
        raise ValueError(f"the fused kernel needs a power-of-two head dim, got {dh}")
    if (g.k_shared and resident.pool_k is None) or (g.v_shared and resident.pool_v is None):
        raise ValueError("the store shares a K/V side the model has no pool for")
    if heads % config.heads_per_program:
        raise ValueError(f"heads_per_program must be a power of two dividing {heads}, got {config.heads_per_program}")
    if raw.device != q.device and not (q.device.type == "cuda" and raw.device.type == "cpu" and raw.is_pinned()):
        raise ValueError(f"the packed batch is on {raw.device}, q on {q.device}: the kernel reads the batch on "
                         "q's device, or in pinned host memory (mapped, zero-copy) for a CUDA q")
    if (not chunks or chunks[0][0] >= 0 or chunks[-1][1] < raw.numel() or any(lo >= hi for lo, hi in chunks)
            or any(a[1] != z[0] for a, z in itertools.pairwise(chunks))):
        raise ValueError(f"chunks must be contiguous (lo, hi] byte ranges from below 0 to past the batch, got {chunks}")
    pool_k, pool_v = padded_pools(resident, KV_TORCH[pool_dtype(config, layout)])
    q = q.float().contiguous()
    out = torch.empty(b, c, d_a, dtype=torch.float32, device=q.device)  # (B, C, d_a)
    if b * c == 0:
        return out
    stages = {} if config.num_stages is None else {"num_stages": config.num_stages}
    rows, groups, max_len = b * c, heads // config.heads_per_program, max(1, layout.max_len)
    parts = split_parts(config, -(-rows // len(chunks)), groups, max_len, q.device)  # programs busy per launch
    seg = -(-max_len // (parts * config.block_l)) * config.block_l  # behaviours per part, whole blocks
    if parts == 1:
        acc, m, l = out, out, out  # the kernel writes the normalised output itself
    else:  # (rows·parts, ·) partial softmax states, combined below
        acc = torch.empty(rows * parts, d_a, dtype=torch.float32, device=q.device)
        m = torch.empty(rows * parts, heads, dtype=torch.float32, device=q.device)
        l = torch.empty(rows * parts, heads, dtype=torch.float32, device=q.device)  # noqa: E741
    header = raw[: 16 * n_users].view(torch.int64)  # offsets (B,), lengths (B,)
    flag = torch.zeros(n_users, dtype=torch.int32, device=q.device) if flags is None else flags
    for index, (end_lo, end_hi) in enumerate(chunks):
        if on_chunk is not None:
            on_chunk(index)
        _collective_attention_kernel[(rows, groups, parts)](
            raw, header, q, pool_k, pool_v, acc, m, l, flag, n_users, c, 1.0 / math.sqrt(dh), end_lo, end_hi,
            cfg.collective.pool_size, D_A=d_a,
            GH=config.heads_per_program, DH=dh, DK=g.dk, DV=g.dv, K_SHARED=g.k_shared,
            V_SHARED=g.v_shared, KV_CODE=KV_CODES[layout.kv_dtype], KV_BYTES=KV_TORCH[layout.kv_dtype].itemsize,
            IDX_BYTES=IDX_BYTES[layout.idx_dtype], HEADER=HEADER_SIZE, BLOCK_L=config.block_l,
            MAX_L=seg if INTERPRETED else 0, SPLIT=parts, SEG=seg, num_warps=config.num_warps, **stages,
        )
    if on_chunk is not None:
        on_chunk(len(chunks))  # after the last launch: a caller that switched streams joins them here
    if parts > 1:
        _combine_parts_kernel[(rows, heads)](acc, m, l, out, D_A=d_a, H=heads, DH=dh, SPLIT=parts, num_warps=1)
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
                                               on_chunk=on_chunk, flags=flags).to(q.dtype))
