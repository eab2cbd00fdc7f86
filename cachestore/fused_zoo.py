"""The zoo models' (SIM, ETA, SDIM, TWIN) decode straight from the packed batch bytes: shape-static,
free of host syncs (CUDA-graph capturable), no K/V materialised per user.

Record format v2 (:mod:`cachestore.entry`): a user with n behaviours has min(n, cap_p) rows of each part p,
the parts back to back in layout order, groups ``short`` then ``long`` (``k_user | v_user | k_idx | v_idx``),
then the retrieval keys. :func:`entry_views` turns the batch header into one
:class:`cachestore.fused.GroupView` per group (starts = offsets + 32 + Σ earlier parts' bytes, rows =
min(n, cap); a few (B,) torch ops). :func:`zoo_static_decode` then runs ``LongSequenceCTR.decode``:

    t     = item embedding of the candidates (B, C, E)
    short = :func:`cachestore.fused.attend_group` over group ``short`` with q = W_q^short t
    long  = the arch's long stage (:data:`LONG_STAGES`) over group ``long``:
            SIM   category top-k from the cached bitmasks (``model.retrieval.category_topk``), then the fused
                  attention over the selected rows only (SELECT mode)
            ETA   SimHash Hamming top-k (``hamming_topk``), then the fused attention over the selected rows
            SDIM  bucket collisions (B·C, m, L) as weights → :func:`cachestore.fused_long.weighted_values`
                  (sum of the colliding V rows per hash function) → L2-normalise, mean over the m functions
            TWIN  :func:`cachestore.fused_long.group_scores` (per-head scores of every long row) → per-head
                  stable top-k (later behaviour first on ties) → softmax → ``weighted_values`` per head
    logits = MLP([short, long, t])

Only the key parts are unpacked to tensors (``unpack_entry(parts=...)``); the L of every intermediate is
the group's cap (the store's long_len), never the batch's longest history, so every shape is host-known.
Pool rows are read at the store's precision unless ``FusedConfig.pool_dtype`` says otherwise
(:func:`group_pools`, cached on the resident per group and dtype). Parity with the model's own decode
(fp32 store, fp32 pools: up to fp32 summation order) and with the eager serving path:
``tests/test_fused_zoo.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cachestore.decode import ResidentZooModel
from cachestore.entry import EntryLayout
from cachestore.fused import DEFAULT_FUSED, FusedConfig, GroupView, attend_group, check_launch, pool_dtype, triton
from cachestore.fused_long import group_scores, weighted_values
from cachestore.record import HEADER_SIZE, RouterIndexError
from cachestore.transfer import KV_TORCH, unpack_entry
from model.attention import masked_softmax, valid_mask
from model.cache_spec import entry_parts, group_specs, key_fields, store_config
from model.config import ModelConfig
from model.entry import unpack_keys
from model.retrieval import bitmask, category_topk, hamming_topk, sdim_buckets, simhash


def entry_views(raw: torch.Tensor, layout: EntryLayout, n_users: int, cfg: ModelConfig) -> dict[str, GroupView]:
    """One :class:`GroupView` per K/V group (``group_specs(cfg)``, cfg: the store's config,
    :func:`model.cache_spec.store_config`) of the v2 batch ``raw`` of ``n_users`` users (module docstring);
    every view's ``ends`` is the record's end. Device ops on (B,) tensors only."""
    header = raw[: 16 * n_users].view(torch.int64)  # offsets (B,), lengths (B,)
    lengths = header[n_users:]
    start = header[:n_users] + HEADER_SIZE  # (B,) where the current part starts
    part_starts: dict[str, torch.Tensor] = {}
    for part, row_bytes in zip(layout.parts, layout.row_bytes, strict=True):
        part_starts[part.name] = start
        start = start + lengths.clamp(max=part.cap) * row_bytes
    pool_size = cfg.collective.pool_size
    return {g.name: GroupView(g, layout.kv_dtype, layout.idx_dtype, pool_size, part_starts[g.part_names()[0]],
                              lengths.clamp(max=g.cap), 0, start) for g in group_specs(cfg)}  # fmt: skip


def check_store(resident: ResidentZooModel, layout: EntryLayout) -> ModelConfig:
    """The store's config (:func:`model.cache_spec.store_config`); ValueError unless ``layout`` is a store of
    this model's arch and parts (collective or full-KV)."""
    cfg = resident.cfg
    if cfg.arch not in LONG_STAGES or layout.arch != cfg.arch:
        raise ValueError(f"zoo_static_decode serves {sorted(LONG_STAGES)} stores of the model's arch; "
                         f"model {cfg.arch!r}, store {layout.arch!r}")
    store_cfg = store_config(cfg, layout.mode)
    if tuple(layout.parts) != entry_parts(store_cfg):
        raise ValueError("the store's parts are not those of this model's cache")
    return store_cfg


def group_pools(resident: ResidentZooModel, group: str, shared: tuple[bool, bool], dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_k, P_v) of the model's TABlock ``group`` as (pool, d_a) rows zero in the d_u user dims, at ``dtype``;
    a 1-row zero tensor for a side ``shared`` says is not shared. Cached on the resident per group and dtype."""
    cache: dict = resident.__dict__.setdefault("_zoo_pools", {})
    key = (group, shared, dtype)
    if key not in cache:
        block = getattr(resident.model, group)
        d_a = resident.cfg.d_attn

        def padded(branch: torch.nn.Module | None, is_shared: bool) -> torch.Tensor:
            if not is_shared or branch is None or branch.pool is None:
                return torch.zeros(1, d_a, dtype=dtype, device=resident.device)
            pool = branch.pool.detach()  # (M, d_a - d_u)
            return torch.cat([pool.new_zeros(pool.shape[0], d_a - pool.shape[1]), pool], 1).to(dtype).contiguous()
        cache[key] = (padded(block.k_branch, shared[0]), padded(block.v_branch, shared[1]))
    return cache[key]


def retrieval_keys(raw: torch.Tensor, layout: EntryLayout, n_users: int, cfg: ModelConfig
                   ) -> dict[str, torch.Tensor]:
    """The retrieval keys of the batch (only the key parts unpacked), (B, long_len) or (B, long_len, m) int64
    (0 past each user's rows); cfg: the store's config."""
    fields = key_fields(cfg)
    names = {f"keys.{name}" for name in fields}
    arrays = unpack_entry(raw, layout, n_users, max(1, layout.max_len), 16 * n_users, parts=names).arrays
    return {name: unpack_keys(arrays[f"keys.{name}"], m, bits) for name, (m, bits) in fields.items()}


@dataclass(frozen=True)
class LongStage:
    """What a long stage reads: the model, the batch, the candidates' embeddings t (B, C, E) and ids (B, C),
    the group ``long``'s view and pools, the retrieval keys (B, L, ...) and each user's n (B,) of users
    0 .. B - 1, the router-index flags and the launch config."""

    model: torch.nn.Module
    cfg: ModelConfig
    raw: torch.Tensor
    t: torch.Tensor
    candidates: torch.Tensor
    view: GroupView
    pools: tuple[torch.Tensor, torch.Tensor]
    keys: dict[str, torch.Tensor]
    lengths: torch.Tensor
    flags: torch.Tensor
    config: FusedConfig

    def attend_selected(self, idx: torch.Tensor, n_sel: torch.Tensor) -> torch.Tensor:
        """Fused attention of each candidate over its retrieved rows idx (B, C, S), n_sel (B, C) → (B, C, d_a)."""
        q = self.model.long.query(self.t)  # (B, C, d_a)
        return attend_group(self.raw, q, self.view, self.pools, self.cfg.n_heads, self.flags, config=self.config,
                            select=(idx.flatten(0, 1).contiguous(), n_sel.flatten()))


def sim_long(s: LongStage) -> torch.Tensor:
    """SIM: category (genre bitmask) top-k, then attention over the selected rows."""
    target = bitmask(s.model.item_genres[s.candidates], check=False)  # (B, C)
    idx, n_sel = category_topk(s.keys["categories"], target, s.lengths, s.cfg.topk, max(1, s.cfg.n_genres))
    return s.attend_selected(idx, n_sel)


def eta_long(s: LongStage) -> torch.Tensor:
    """ETA: SimHash Hamming top-k, then attention over the selected rows."""
    codes = simhash(s.t, s.model.hash_planes)  # (B, C)
    idx, n_sel = hamming_topk(s.keys["simhash"], codes, s.lengths, s.cfg.topk, s.cfg.hash_bits)
    return s.attend_selected(idx, n_sel)


def sdim_long(s: LongStage) -> torch.Tensor:
    """SDIM: per hash function the sum of the V rows in the candidate's bucket, L2-normalised, mean."""
    b, c, _ = s.t.shape
    behaviour = s.keys["buckets"]  # (B, L, m)
    target = sdim_buckets(s.t, s.model.hash_planes)  # (B, C, m)
    valid = valid_mask(s.lengths, behaviour.shape[1])  # (B, L)
    collide = (behaviour.unsqueeze(1) == target.unsqueeze(2)) & valid[:, None, :, None]  # (B, C, L, m)
    weights = collide.permute(0, 1, 3, 2).flatten(0, 1).float()  # (B·C, m, L)
    d_a = s.cfg.d_attn
    sums = weighted_values(s.raw, s.view, s.pools[1], weights, None, c, d_a, 0, s.flags)  # (B·C, m, d_a)
    return torch.nn.functional.normalize(sums, dim=-1).mean(dim=1).reshape(b, c, d_a)


def twin_long(s: LongStage) -> torch.Tensor:
    """TWIN: per-head scores of every long row, per-head top-k (ties: later row first), softmax, values."""
    b, c, _ = s.t.shape
    heads, d_a = s.cfg.n_heads, s.cfg.d_attn
    q = s.model.long.query(s.t)  # (B, C, d_a)
    scores = group_scores(s.raw, q, s.view, s.pools[0], heads, s.flags)  # (B·C, H, cap)
    cap = scores.shape[-1]
    k = min(s.cfg.topk, cap)
    top, rev = scores.flip(-1).sort(dim=-1, descending=True, stable=True)  # (B·C, H, cap)
    top, idx = top[..., :k], cap - 1 - rev[..., :k]  # (B·C, H, k)
    n_sel = s.view.rows[:b].clamp(max=k).unsqueeze(1).expand(b, c).reshape(-1)  # (B·C,) valid scores rank first
    weights = masked_softmax(top, n_sel)  # (B·C, H, k)
    out = weighted_values(s.raw, s.view, s.pools[1], weights, idx, c, d_a // heads, d_a // heads, s.flags)
    return out.reshape(b, c, d_a)  # (B·C, H, dh) → (B, C, d_a)


LONG_STAGES: dict[str, Callable[[LongStage], torch.Tensor]] = {
    "sim": sim_long, "eta": eta_long, "sdim": sdim_long, "twin": twin_long,
}


def zoo_static_decode(raw: torch.Tensor, candidates: torch.Tensor, *, resident: ResidentZooModel,
                      layout: EntryLayout, n_users: int, config: FusedConfig = DEFAULT_FUSED,
                      flags: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, C) of ``candidates`` (B, C) int64 of users 0 .. B - 1 (B <= n_users) of the packed v2 batch
    ``raw`` (uint8, on the resident's device, header at 0, zero block at 16·n_users: :mod:`cachestore.batch`)
    for a SIM/ETA/SDIM/TWIN ``resident`` — ``LongSequenceCTR.decode`` from the bytes in place (module
    docstring), the attention kernels launched with ``config``. ``flags`` ((n_users,) int32): set to 1 for a
    user with a router index outside a pool (read as zeros); without it a ``RouterIndexError`` after a host
    sync. Shape-static and free of host syncs when ``flags`` is given. Call under ``torch.inference_mode()``."""
    if triton is None:
        raise RuntimeError("the fused zoo decode needs Triton (pip install triton), or use the eager path")
    cfg = resident.cfg
    store_cfg = check_store(resident, layout)
    check_launch(cfg.n_heads, cfg.d_attn, config)
    if candidates.dim() != 2 or candidates.shape[0] > n_users:
        raise ValueError(f"candidates {tuple(candidates.shape)}: want (B, C) with B <= {n_users} users")
    b = candidates.shape[0]
    flag = torch.zeros(n_users, dtype=torch.int32, device=raw.device) if flags is None else flags
    views = entry_views(raw, layout, n_users, store_cfg)
    dtype = KV_TORCH[pool_dtype(config, layout)]
    pools = {name: group_pools(resident, name, (v.group.k_shared, v.group.v_shared), dtype)
             for name, v in views.items()}  # fmt: skip
    model = resident.model
    t = model.item_embedding(candidates)  # (B, C, E)
    short = attend_group(raw, model.short.query(t), views["short"], pools["short"], cfg.n_heads, flag, config=config)
    keys = {name: k[:b] for name, k in retrieval_keys(raw, layout, n_users, store_cfg).items()}
    lengths = raw[8 * n_users : 16 * n_users].view(torch.int64)[:b]  # (B,) n per user (<= long_len)
    long = LONG_STAGES[cfg.arch](LongStage(model, cfg, raw, t, candidates, views["long"], pools["long"], keys,
                                           lengths, flag, config))  # (B, C, d_a)
    logits = model.mlp(torch.cat([short.to(t.dtype), long.to(t.dtype), t], dim=-1)).squeeze(-1)  # (B, C)
    if flags is None and bool(flag.any()):
        raise RouterIndexError(f"a router index outside the pool 0..{cfg.collective.pool_size - 1} in batch row "
                               f"{int(torch.nonzero(flag)[0, 0])}: the record is corrupt "
                               "(run `ckv store verify STORE`)")
    return logits
