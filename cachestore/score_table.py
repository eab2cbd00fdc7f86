"""Per-request key-score table: every pool entry's collective key score, computed before the batch lands.

The fused kernel (:mod:`cachestore.fused`) scores behaviour l of row r (user b, candidate c) at head h as

    s[r, l, h] = q[r, h] · k_user[l, h] + q[r, h] · P_k[k_idx[l], h]          (q scaled by 1/sqrt(dh))

Its second term depends on the behaviour only through its router index, so for a batch it is a lookup in

    T[r, m, h] = Σ_d q[r, h·dh + d] · P_k[m, h·dh + d] · scale        (rows, M, H) fp32, M = pool entries

(the issue's q·[k_u; P_k[i]] = q_u·k_u + (P_k q_c)[i]). T depends on the candidates' queries and the
pool only — not on the copied user records — so inside the serving graph it is computed while the batch
is still crossing PCIe, and the kernel then reads one 4·H-byte sector per behaviour instead of a d_a-wide
pool row (:class:`cachestore.fused.FusedConfig` ``score_table``). The table has rows · M · H fp32 entries
(B 512, pool 10,000, 8 heads: 164 MB of device memory, written once per batch).

Layout: row-major (rows, M, H): the H head scores of one (row, entry) are contiguous, so the kernel's
lookup of all its heads for a behaviour is one contiguous read. :func:`score_table_reference` is the plain
PyTorch math; :func:`score_table` is the Triton kernel (tensor cores with the 3×TF32 split, so the result
stays within fp32 rounding of the reference). Both take the pool as (M, d_a) rows, zero in the user dims
(:func:`cachestore.fused.padded_pools`), any float dtype (fp16 rows are exact in fp32).
"""

from __future__ import annotations

import torch

try:  # Triton is optional (see cachestore.fused)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def score_table_reference(q: torch.Tensor, pool_k: torch.Tensor, n_heads: int, scale: float) -> torch.Tensor:
    """T (rows, M, H) fp32 of queries ``q`` (rows, d_a) against pool rows ``pool_k`` (M, d_a): the math."""
    rows, d_a = q.shape
    qh = q.float().reshape(rows, n_heads, d_a // n_heads) * scale  # (rows, H, dh)
    ph = pool_k.float().reshape(pool_k.shape[0], n_heads, d_a // n_heads)  # (M, H, dh)
    return torch.einsum("rhd,mhd->rmh", qh, ph).contiguous()  # (rows, M, H)


if triton is not None:

    @triton.jit
    def _score_table_kernel(q_ptr, pool_ptr, t_ptr, rows, n_entries, scale, D_A: tl.constexpr, H: tl.constexpr,
                            HP: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
        """Program (i, j): T[rows i·BLOCK_R.., entries j·BLOCK_M.., all heads] as one batched (over heads)
        tensor-core product, head and head dims padded to the powers of two HP, DHP (masked)."""
        rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        hs = tl.arange(0, HP)  # (HP,)
        ds = tl.arange(0, DHP)  # (DHP,)
        head_ok = (hs < H)[:, None, None] & (ds < DH)[None, None, :]  # (HP, 1, DHP)
        q = tl.load(q_ptr + rs[None, :, None] * D_A + hs[:, None, None] * DH + ds[None, None, :],
                    mask=head_ok & (rs < rows)[None, :, None], other=0.0).to(tl.float32) * scale  # (HP, BLOCK_R, DHP)
        p = tl.load(pool_ptr + ms[None, None, :] * D_A + hs[:, None, None] * DH + ds[None, :, None],
                    mask=tl.permute(head_ok, (0, 2, 1)) & (ms < n_entries)[None, None, :],
                    other=0.0).to(tl.float32)  # (HP, DHP, BLOCK_M)
        t = tl.dot(q, p, input_precision=PRECISION)  # (HP, BLOCK_R, BLOCK_M)
        ptr = t_ptr + rs[None, :, None] * (n_entries * H) + ms[None, None, :] * H + hs[:, None, None]
        tl.store(ptr, t, mask=(hs < H)[:, None, None] & (rs < rows)[None, :, None] & (ms < n_entries)[None, None, :])


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


def score_table(q: torch.Tensor, pool_k: torch.Tensor, n_heads: int, scale: float, *, block_r: int = 32,
                block_m: int = 64) -> torch.Tensor:
    """T (rows, M, H) fp32 of queries ``q`` (rows, d_a) against pool rows ``pool_k`` (M, d_a) on their
    device (Triton: CUDA, or its interpreter); equals :func:`score_table_reference` within fp32 rounding
    (3×TF32 tensor-core products). Shape-static and free of host syncs (CUDA-graph capturable)."""
    if triton is None:
        raise RuntimeError("the score table needs Triton (pip install triton)")
    rows, d_a = q.shape
    if pool_k.shape[1] != d_a or d_a % n_heads:
        raise ValueError(f"q {tuple(q.shape)} and pool {tuple(pool_k.shape)} do not share d_a in {n_heads} heads")
    n_entries, dh = pool_k.shape[0], d_a // n_heads
    table = torch.empty(rows, n_entries, n_heads, dtype=torch.float32, device=q.device)  # (rows, M, H)
    if rows == 0:
        return table
    grid = (triton.cdiv(rows, block_r), triton.cdiv(n_entries, block_m))
    _score_table_kernel[grid](q.contiguous(), pool_k.contiguous(), table, rows, n_entries, scale, D_A=d_a, H=n_heads,
                              HP=_pow2(n_heads), DH=dh, DHP=_pow2(dh, 16), BLOCK_R=block_r, BLOCK_M=block_m,
                              PRECISION="tf32x3", num_warps=4)
    return table
