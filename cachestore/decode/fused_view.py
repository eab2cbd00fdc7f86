"""Where a K/V group sits in a packed batch, as the fused kernels read it in place: :class:`GroupView` (per
user: the byte start of the group's parts and its row count), din's one group (:func:`din_view`, straight from
the batch header) and every part's byte start of a zoo record (:func:`record_part_starts`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.record import HEADER_SIZE
from collectivekv.model.cache_spec import GroupSpec

if TYPE_CHECKING:
    from collectivekv.cachestore.decode.decode import ResidentModel, ResidentZooModel

KV_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}  # a float user part's storage, as the kernels read it
Q8_CODE = 3  # a user part of int8 codes (part kind q8), read as fp32 code · scale
HALVES_CODE = 4  # an fp32 user part that can start at a 2-byte boundary, read as two 16-bit halves
KV_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class GroupView:
    """Where one K/V group (:class:`model.cache_spec.GroupSpec`) sits in a packed batch, per user b:
    its parts ``k_user | v_user | k_idx | v_idx`` (those the group has, ``rows[b]`` rows each, at ``kv_dtype``
    and ``idx_dtype``) from byte ``starts[b] + start_add``; ``rows`` (B,) int64 = min(n_b, cap) (0: cold);
    ``ends`` (B,) int64: one past each user's record, the byte the chunk test of ``chunks`` reads (None: one
    past the group's last part, the record's end when the group ends the record, as din's does). The tensors
    live on the batch's device; ``pool_size`` bounds the router indices. ``halves`` (K, V): an fp32 user part
    that can start off a 4-byte boundary (after an odd number of 2-byte index or int8 rows), read as 16-bit
    halves."""

    group: GroupSpec
    kv_dtype: str
    idx_dtype: str | None
    pool_size: int
    starts: torch.Tensor
    rows: torch.Tensor
    start_add: int = 0
    ends: torch.Tensor | None = None
    halves: tuple[bool, bool] = (False, False)


def side_codes(group: GroupSpec, kv_dtype: str, halves: tuple[bool, bool] = (False, False)
               ) -> tuple[int, int, int, int]:
    """(K_CODE, V_CODE, K_BYTES, V_BYTES) of ``group``'s user parts as the kernels read them: KV_CODES[kv_dtype]
    (HALVES_CODE for a side ``halves`` marks) at its itemsize, or Q8_CODE at 1 byte for a q8 side
    (:meth:`GroupSpec.user_kind`)."""
    def code(side: str, half: bool) -> int:
        if group.user_kind(side) == "q8":
            return Q8_CODE
        return HALVES_CODE if half and kv_dtype == "float32" else KV_CODES[kv_dtype]
    k, v = code("k", halves[0]), code("v", halves[1])
    return k, v, 1 if k == Q8_CODE else KV_BYTES[kv_dtype], 1 if v == Q8_CODE else KV_BYTES[kv_dtype]


def group_scales(resident: ResidentZooModel, group: GroupSpec) -> tuple[float, float]:
    """The (K, V) fp32 scales of ``group``'s int8 user parts (``resident.scales`` by part name, from the
    checkpoint); 1.0 for a float side (the kernels do not read it)."""
    return tuple(resident.scales.get(f"{group.name}.{side}_user", 1.0) for side in "kv")  # type: ignore[return-value]


def may_misalign(layout: EntryLayout, name: str, size: int) -> bool:
    """Whether part ``name`` can start off a ``size``-byte boundary in a record (records start 8-aligned): part p
    starts Σ_{q<p} min(n, cap_q)·row_bytes_q into the payload, a multiple of ``size`` for every n when, per
    distinct cap, the row bytes of the earlier parts of that cap sum to one."""
    sums: dict[int, int] = {}
    for part, row_bytes in zip(layout.parts, layout.row_bytes, strict=True):
        if part.name == name:
            return any(total % size for total in sums.values())
        sums[part.cap] = sums.get(part.cap, 0) + row_bytes
    raise ValueError(f"the store has no part {name!r}")


def user_halves(layout: EntryLayout, group: GroupSpec) -> tuple[bool, bool]:
    """(K, V): whether ``group``'s fp32 user part can start off a 4-byte boundary (:func:`may_misalign`), so that
    the kernels read it as 16-bit halves (:data:`HALVES_CODE`); False for other dtypes and absent parts."""
    names = {p.name for p in layout.parts}
    return tuple(layout.kv_dtype == "float32" and f"{group.name}.{side}_user" in names  # type: ignore[return-value]
                 and may_misalign(layout, f"{group.name}.{side}_user", 4) for side in "kv")


BYTEWISE = {"sdim": frozenset({"long.v_idx"})}  # index parts a model's fused kernels read byte by byte


def misplaced_part(layout: EntryLayout) -> str | None:
    """The first part the zoo's fused kernels cannot read in place, or None: a float user part or an index part
    (read as 16-bit halves) that can start off a 2-byte boundary (after int8 codes of odd width), except the
    parts of :data:`BYTEWISE`. Float stores have none (their parts are whole 2-byte values; fp32 user parts off a
    4-byte boundary are read as halves: :func:`user_halves`)."""
    skip = BYTEWISE.get(layout.arch, frozenset())
    return next((p.name for p in layout.parts
                 if p.kind in ("kv", "idx") and p.name not in skip and may_misalign(layout, p.name, 2)), None)


def check_half_layout(layout: EntryLayout, what: str) -> None:
    """ValueError naming the part where ``what`` (a zoo model's fused kernels) cannot read the store in place
    (:func:`misplaced_part`): such a store is served by the eager path."""
    name = misplaced_part(layout)
    if name is not None:
        raise ValueError(f"{what}: part {name} of this store can start off a 2-byte boundary (int8 codes of odd "
                         "width before it): serve it with the eager path (--path gather)")


def din_group(layout: EntryLayout) -> GroupSpec:
    """The one K/V group of a din store (``layout.flat_group``), as the kernel's :class:`GroupSpec`."""
    g = layout.flat_group
    if g is None:
        raise ValueError("the fused decode reads din batches only")
    return g


def din_view(raw: torch.Tensor, layout: EntryLayout, n_users: int, pool_size: int) -> GroupView:
    """The din group of a batch, read straight from the batch header (views, no device op): starts =
    offsets (+ the 32-byte record header), rows = lengths (n <= max_len = the group's cap)."""
    header = raw[: 16 * n_users].view(torch.int64)  # offsets (B,), lengths (B,)
    return GroupView(din_group(layout), layout.kv_dtype, layout.idx_dtype, pool_size, header[:n_users],
                     header[n_users:], HEADER_SIZE)


@functools.cache  # never evicted: a captured graph reads these tensors' addresses
def part_rows(layout: EntryLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(caps, row bytes), each (P + 1, 1) int64 on ``device``: a zero row, then every part's cap and row bytes
    (the first call of a layout on a device copies them there: a warm-up, never inside a graph capture)."""
    caps = [0] + [p.cap for p in layout.parts]
    row_bytes = [0, *layout.row_bytes]
    return (torch.tensor(caps, dtype=torch.int64).unsqueeze(1).to(device),
            torch.tensor(row_bytes, dtype=torch.int64).unsqueeze(1).to(device))  # fmt: skip


def record_part_starts(raw: torch.Tensor, layout: EntryLayout, n_users: int) -> torch.Tensor:
    """(P + 1, B) int64: byte start in ``raw`` of part p of user b's record, ``offsets[b] + 32 +
    Σ_{i<p} min(n_b, cap_i)·row_bytes_i``, and in row P one past the record (a cold-start user: the zero
    block, n 0). A few (P + 1, B) device ops from the batch header whatever P is, no host sync."""
    header = raw[: 16 * n_users].view(torch.int64)  # offsets (B,), lengths (B,)
    offsets, lengths = header[:n_users], header[n_users:]
    caps, row_bytes = part_rows(layout, raw.device)
    sizes = torch.minimum(lengths.clamp(min=0).unsqueeze(0), caps) * row_bytes  # (P + 1, B), row 0 zero
    return sizes.cumsum(0).add_(offsets + HEADER_SIZE)  # (P + 1, B): row p = Σ_{i<p} part sizes + record start


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
