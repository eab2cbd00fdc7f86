"""The one decode entry point of serving: a cache batch + candidate items → logits.

:func:`decode` is what the runtime (:mod:`cachestore.decode.runtime`), ``ckv score``, the latency
benchmark and the tests call. It computes exactly ``TargetAttentionCTR.decode`` (target item
embedding → q → multi-head target attention over the user's K/V → MLP), with the attention done
one of two ways:

``gather`` (the reference): rebuild K and V as ``concat(user part, pool[idx])`` (B, L, d_a) with
    ``model.keys_values`` and run :func:`model.attention.target_attention` — what training does.
``poolscore``: never materialise the collective K/V. With the pool zero-padded in the user dims,
    K_l = [k_u,l ; 0] + [0 ; P_k[i_l]], so per head h (d_a split into contiguous heads, the d_u user
    dims first — with d_u = 1 they sit in head 0)

        score_h,l = q_h·k_h,l = (user dims of head h)·k_u,l + S_h[i_l],   S_h = P_k,h q_h  (pool_size,)

    i.e. one (H, B·C, dh) x (H, dh, pool) matmul and a gather of L entries per row; and

        Σ_l a_h,l V_h,l = Σ_l a_h,l [v_u,l]_h + (bincount of i weighted by a_h) @ P_v,h

    i.e. a scatter-add of the weights into (H, B·C, pool) and one matmul with the pool.

Cost: ``poolscore`` writes (H·C·pool) values per user and shared side, ``gather`` (L·d_a); ``auto``
picks the smaller (:func:`choose_path`): poolscore at the paper's L = 1000 (8·10,000 < 1000·256),
gather at L = 50. benchmarks/decode_latency.py times both paths on the target GPU.

User parts are cast to the model's dtype before anything else (the store keeps them as fp16), so
pool rows are never rounded: both paths compute the model's fp32 math on the stored user parts.

Stores hold one record format (:mod:`cachestore.store.entry`): :func:`entry_cache` turns an unpacked batch
(:class:`cachestore.decode.transfer.EntryBatch`) into the model's :class:`model.blocks.ZooCache` (kv parts
cast to the model's dtype, then ``model.entry.cache_from_arrays``) and :func:`decode_zoo` runs a zoo
model's own ``decode`` (its retrieval + attention; there is no poolscore path for these models) on a
:class:`ResidentZooModel`. A ``din`` batch is its one group ``"kv"`` (:func:`din_cache`), decoded by
:func:`decode` above.
:func:`cachestore.decode.fused_zoo.zoo_static_decode` and :func:`cachestore.decode.fused_hstu.hstu_static_decode`
compute the
same zoo logits from the packed batch bytes in place (Triton kernels, shape-static, no per-user K/V).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from collectivekv.cachestore.store.record import RouterIndexError
from collectivekv.model.attention import masked_softmax
from collectivekv.model.blocks import ZooCache
from collectivekv.model.cache import KVCache
from collectivekv.model.cache_spec import store_config
from collectivekv.model.config import ModelConfig
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.entry import cache_from_arrays, user_scales
from collectivekv.model.quant import dequantise

if TYPE_CHECKING:
    from collectivekv.cachestore.decode.transfer import EntryBatch
    from collectivekv.cachestore.store.entry import EntryLayout

PATHS = ("auto", "poolscore", "gather")
# ResidentModel.item_rows: the most device memory the per-item candidate-side tables (t | q) may take
ITEM_TABLE_BYTES = 1 << 30


def _head_slices(d_user: int, head_dim: int) -> list[tuple[int, int, int]]:
    """(head, first dim, end dim) of each head that holds some of the d_user user dims."""
    return [(h, h * head_dim, min((h + 1) * head_dim, d_user)) for h in range(-(-d_user // head_dim))]


class ResidentZooModel:
    """A scoring model kept on one device in eval mode, with its pools: ``model``, ``cfg``, ``device``,
    ``dtype`` and ``scales`` (the checkpoint's fp32 scale of every int8 user part, by part name:
    ``model.entry.user_scales``; empty for float user parts). Serves the zoo models (SIM, ETA, SDIM, TWIN, HSTU:
    ``model.zoo``) as it is."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None) -> None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(device).eval()
        self.cfg: ModelConfig = model.cfg
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.scales: dict[str, float] = user_scales(model, self.cfg)


class ResidentModel(ResidentZooModel):
    """The din scoring model kept on one device, plus the pools laid out per head for ``poolscore`` and the
    candidate side tabulated per item.

    Moves ``model`` to ``device`` (eval mode). For a shared K: ``pool_k`` (H, dh, pool) = the K pool
    zero-padded to d_a dims (zeros in the user dims) and split into heads, transposed for q·P;
    for a shared V: ``pool_v`` (H, pool, dh). ``item_rows``: (t (n_items + 1, E), q (n_items + 1, d_a)) =
    ``model.candidate_side`` of every item id, so a request's candidate side is two row gathers instead of the
    embedding, genre bag and query projection (7 kernels); None when the two tables would pass
    :data:`ITEM_TABLE_BYTES` (the model then runs its own). Like the pools, a snapshot of the model when it was
    loaded (a server loads a new version for new weights).
    """

    def __init__(self, model: TargetAttentionCTR, device: torch.device | str | None = None) -> None:
        super().__init__(model, device)
        self.n_heads = self.cfg.n_heads
        self.head_dim = self.cfg.d_attn // self.n_heads
        k_pool, v_pool = model.k_branch.collective_pool(), model.v_branch.collective_pool()
        self.pool_k = self._per_head(k_pool, transpose=True) if self.cfg.k_shared else None
        self.pool_v = self._per_head(v_pool, transpose=False) if self.cfg.v_shared else None
        self.item_rows = self._item_rows()

    @torch.no_grad()
    def _item_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.cfg
        items = cfg.n_items + 1
        if items * (cfg.embed_dim + cfg.d_attn) * self.dtype.itemsize > ITEM_TABLE_BYTES:
            return None
        t, q = self.model.candidate_side(torch.arange(items, device=self.device))  # (N, E), (N, d_a)
        return t.contiguous(), q.contiguous()

    def candidate_side(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.candidate_side(targets)`` by row gathers from :attr:`item_rows` (the model's own without)."""
        if self.item_rows is None:
            return self.model.candidate_side(targets)
        t, q = self.item_rows
        return nn.functional.embedding(targets, t), nn.functional.embedding(targets, q)

    @torch.no_grad()
    def _per_head(self, pool: torch.Tensor | None, transpose: bool) -> torch.Tensor:
        assert pool is not None
        m, d_c = pool.shape
        full = torch.cat([pool.new_zeros(m, self.cfg.d_attn - d_c), pool], dim=1)  # (M, d_a)
        heads = full.view(m, self.n_heads, self.head_dim)  # (M, H, dh)
        return (heads.permute(1, 2, 0) if transpose else heads.permute(1, 0, 2)).contiguous().detach()


def choose_path(cache: KVCache, n_candidates: int, resident: ResidentModel) -> str:
    """``poolscore`` when its intermediates (H·C·pool per user) are smaller than the materialised
    K/V (L·d_a per user), else ``gather``; ``gather`` when nothing is shared (both are the same)."""
    if cache.k_idx is None and cache.v_idx is None:
        return "gather"
    pool = resident.cfg.collective.pool_size
    length = cache.k_user.shape[1]
    return "poolscore" if n_candidates * resident.n_heads * pool < length * resident.cfg.d_attn else "gather"


def pool_score_attention(resident: ResidentModel, q: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Target attention (B, C, d_a) of q (B, C, d_a) over the cache without materialising the
    collective K/V (see the module docstring). Equals ``target_attention(q, *keys_values(cache))``."""
    b, c, d_a = q.shape
    h, dh = resident.n_heads, resident.head_dim
    length = cache.k_user.shape[1]
    qh = q.reshape(b, c, h, dh)
    if cache.k_idx is not None:
        assert resident.pool_k is not None
        pool = resident.pool_k.shape[2]
        q_heads = qh.permute(2, 0, 1, 3).reshape(h, b * c, dh)  # (H, BC, dh)
        table = torch.bmm(q_heads, resident.pool_k).view(h, b, c, pool)  # (H, B, C, M): q_h · P_k,h[m]
        index = cache.k_idx.view(1, b, 1, length).expand(h, b, c, length)
        scores = torch.gather(table, 3, index)  # (H, B, C, L)
        k_user = cache.k_user
        for head, lo, hi in _head_slices(k_user.shape[2], dh):  # user dims (head 0 when d_u <= dh)
            scores[head] += torch.bmm(q[:, :, lo:hi], k_user[:, :, lo:hi].transpose(1, 2))  # (B, C, L)
    else:
        scores = torch.einsum("bchd,blhd->hbcl", qh, cache.k_user.reshape(b, length, h, dh))
    weights = masked_softmax((scores / math.sqrt(dh)).permute(1, 0, 2, 3), cache.lengths)  # (B, H, C, L)
    weights = weights.permute(1, 0, 2, 3)  # (H, B, C, L)
    if cache.v_idx is not None:
        assert resident.pool_v is not None
        pool = resident.pool_v.shape[1]
        index = cache.v_idx.view(1, b, 1, length).expand(h, b, c, length)
        counts = torch.zeros(h, b, c, pool, dtype=weights.dtype, device=weights.device)
        counts.scatter_add_(3, index, weights)  # (H, B, C, M): weighted bincount of the V indices
        out = torch.bmm(counts.view(h, b * c, pool), resident.pool_v)  # (H, BC, dh)
        out = out.view(h, b, c, dh).permute(1, 2, 0, 3).reshape(b, c, d_a)  # (B, C, d_a), a copy
        v_user = cache.v_user
        for head, lo, hi in _head_slices(v_user.shape[2], dh):
            out[:, :, lo:hi] += torch.bmm(weights[head], v_user[:, :, lo:hi])  # (B, C, n)
        return out
    return torch.einsum("hbcl,blhd->bchd", weights, cache.v_user.reshape(b, length, h, dh)).reshape(b, c, d_a)


def _cast(cache: KVCache, resident: ResidentModel) -> KVCache:
    """User parts at the model's dtype; int8 codes (an int8 store) first become fp32 ``code · scale``."""
    def user(t: torch.Tensor, side: str) -> torch.Tensor:
        if t.dtype == torch.int8:
            t = dequantise(t, resident.scales[f"kv.{side}_user"])
        return t.to(resident.dtype)

    return KVCache(k_user=user(cache.k_user, "k"), v_user=user(cache.v_user, "v"), k_idx=cache.k_idx,
                   v_idx=cache.v_idx, lengths=cache.lengths)


def bound_router_indices(resident: ResidentZooModel, cache: KVCache, flags: torch.Tensor | None = None) -> KVCache:
    """``cache`` with every router index outside the pool (0 .. pool_size - 1) replaced by 0, so that no
    pool read leaves the pool. Users with such an index: ``flags[b] |= 1`` (flags (B,) int32 on the cache's
    device; no host sync, CUDA-graph capturable; the caller raises after the batch), or without ``flags``
    a :class:`cachestore.store.record.RouterIndexError` naming the batch row (one host sync)."""
    pool = resident.cfg.collective.pool_size
    bad: torch.Tensor | None = None
    out: dict[str, torch.Tensor] = {}
    for name in ("k_idx", "v_idx"):
        idx = getattr(cache, name)
        if idx is None:
            continue
        outside = (idx < 0) | (idx >= pool)  # (B, L); padding positions hold index 0
        bad = outside.any(dim=1) if bad is None else bad | outside.any(dim=1)
        out[name] = torch.where(outside, torch.zeros_like(idx), idx)
    if bad is None:
        return cache
    if flags is not None:
        flags.bitwise_or_(bad.to(torch.int32))
    elif bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise RouterIndexError(f"a router index outside the pool 0..{pool - 1} in batch row {row}: the record is "
                               "corrupt (run `ckv store verify STORE`)")
    return dataclasses.replace(cache, **out)


def decode(resident: ResidentModel, cache: KVCache, targets: torch.Tensor, path: str = "auto",
           flags: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of candidates ``targets`` (B,) or (B, C) against a padded cache batch on the resident
    model's device: ``TargetAttentionCTR.decode`` with the attention computed by ``path`` ("auto",
    "poolscore" or "gather"; module docstring). Router indices are bounded first
    (:func:`bound_router_indices`: ``flags`` (B,) int32 marks the users with one outside the pool, or
    without ``flags`` a ``RouterIndexError``). Returns the logits in ``targets``' shape. Call under
    ``torch.inference_mode()`` / ``no_grad``."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    n_candidates = 1 if targets.dim() == 1 else targets.shape[1]
    if targets.shape[0] != cache.batch_size:
        raise ValueError(f"{targets.shape[0]} target rows for a cache of {cache.batch_size} users")
    cache = bound_router_indices(resident, _cast(cache, resident), flags)
    if path == "auto":
        path = choose_path(cache, n_candidates, resident)
    if path == "gather" or (cache.k_idx is None and cache.v_idx is None):
        return resident.model.decode(cache, targets, candidate_side=resident.candidate_side)
    return resident.model.decode(cache, targets, attention=lambda q, c: pool_score_attention(resident, q, c),
                                 candidate_side=resident.candidate_side)


def din_cache(batch: EntryBatch) -> KVCache:
    """The din :class:`KVCache` of an unpacked batch: its one group ``"kv"``, as
    ``model.entry.cache_from_arrays(...).kv["kv"]`` builds it (k_user (B, L, dk), v_user (B, L, dv) at the
    stored dtype, or int8 codes — :func:`decode` casts them, and scales codes —, k_idx / v_idx (B, L) int64 or
    None, the same tensor for a joint ``kv.kv_idx``, lengths (B,)), without the config: views only, no copy, no
    host sync (the CUDA graphs capture it)."""
    a = batch.arrays

    def idx(side: str) -> torch.Tensor | None:
        t = a.get(f"kv.{side}_idx", a.get("kv.kv_idx"))
        return None if t is None else t.squeeze(-1)  # (B, L, 1) -> (B, L)

    return KVCache(k_user=a["kv.k_user"], v_user=a["kv.v_user"], k_idx=idx("k"), v_idx=idx("v"), lengths=batch.lengths)


def entry_cache(batch: EntryBatch, cfg: ModelConfig, dtype: torch.dtype,
                scales: dict[str, float] | None = None) -> ZooCache:
    """An unpacked batch → the :class:`ZooCache` the model decodes: kv parts cast to ``dtype``
    (the model's: pool rows are never rounded to the stored fp16), int8 codes to fp32 ``code · scale``
    (``scales``: ``ResidentZooModel.scales``) then ``dtype``, indices and keys as they are.
    ``cfg``: :func:`model.entry.store_config` of the model's config and the store's mode."""
    arrays = {name: t.to(dtype) if t.is_floating_point() else t for name, t in batch.arrays.items()}
    cache = cache_from_arrays(arrays, batch.lengths, cfg, scales)
    if not any(t.dtype == torch.int8 for t in arrays.values()):
        return cache
    kv = {name: dataclasses.replace(c, k_user=c.k_user.to(dtype), v_user=c.v_user.to(dtype))
          for name, c in cache.kv.items()}  # fmt: skip
    return dataclasses.replace(cache, kv=kv)


def bound_entry_indices(batch: EntryBatch, layout: EntryLayout, flags: torch.Tensor) -> EntryBatch:
    """An unpacked zoo batch with every router index outside 0 .. layout.pool_size - 1 (a corrupt record) read as 0,
    so the model's pool gathers stay in bounds; those users' ``flags`` (B,) int32 set to 1 (no host sync: the
    caller refuses the batch after it, naming the user — :func:`bound_router_indices` for din caches)."""
    arrays = dict(batch.arrays)
    for part in layout.parts:
        if part.kind == "idx":
            idx = arrays[part.name]  # (B, R, w) int64; padding holds 0
            outside = (idx < 0) | (idx >= layout.pool_size)
            flags.bitwise_or_(outside.flatten(1).any(1).to(torch.int32))
            arrays[part.name] = torch.where(outside, torch.zeros_like(idx), idx)
    return dataclasses.replace(batch, arrays=arrays)


def decode_zoo_batch(resident: ResidentZooModel, batch: EntryBatch, layout: EntryLayout, targets: torch.Tensor,
                     flags: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode_zoo` of an unpacked batch of the store ``layout`` — every eager zoo decode; with ``flags`` its
    router indices outside the pool are flagged and read as 0 first (:func:`bound_entry_indices`)."""
    if flags is not None:
        batch = bound_entry_indices(batch, layout, flags)
    cache = entry_cache(batch, store_config(resident.cfg, layout.mode), resident.dtype, resident.scales)
    return decode_zoo(resident, cache, targets)


def decode_zoo(resident: ResidentZooModel, cache: ZooCache, targets: torch.Tensor) -> torch.Tensor:
    """Logits of candidates ``targets`` (B,) or (B, C) against a zoo cache on the resident model's
    device: the model's own ``decode`` (each candidate scored independently). Call under
    ``torch.inference_mode()`` / ``no_grad``."""
    if targets.shape[0] != cache.batch_size:
        raise ValueError(f"{targets.shape[0]} target rows for a cache of {cache.batch_size} users")
    return resident.model.decode(cache, targets)
