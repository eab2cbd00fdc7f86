"""The zoo models' (SIM, ETA, SDIM, TWIN) decode straight from the packed batch bytes: shape-static,
free of host syncs (CUDA-graph capturable), no K/V materialised per user.

The record format (:mod:`cachestore.store.entry`): a user with n behaviours has min(n, cap_p) rows of each part p,
the parts back to back in layout order, groups ``short`` then ``long`` (``k_user | v_user | k_idx | v_idx``),
then the retrieval keys. :func:`entry_views` turns the batch header into one
:class:`cachestore.decode.fused_view.GroupView` per group (starts = offsets + 32 + Σ earlier parts' bytes, rows =
min(n, cap); a few (B,) torch ops). :func:`zoo_static_decode` then runs ``LongSequenceCTR.decode``:

    t     = item embedding of the candidates (B, C, E)
    short = :func:`cachestore.decode.fused.attend_group` over group ``short`` with q = W_q^short t
    long  = the arch's long stage (:data:`LONG_STAGES`) over group ``long``:
            SIM   category top-k on the cached bitmasks, or those the router indices name (keys from the index)
                  (:func:`cachestore.decode.fused_select.key_select`: the top-k of
                  ``model.retrieval.category_topk``'s ranks in one kernel), the fused attention over the selected rows
                  only (SELECT mode)
            ETA   SimHash Hamming top-k (``key_select`` on ``hamming_topk``'s ranks), then the same attention
            SDIM  :func:`cachestore.decode.fused_long.bucket_sums` (per hash function, the sum of the V rows whose
                  bucket, read from the packed key bytes or as V index ÷ S, equals the candidate's) → L2-normalise,
                  mean over m
            TWIN  :func:`cachestore.decode.fused_long.group_scores` (per-head scores of every long row) → per-head
                  stable top-k (later behaviour first on ties) → softmax → ``weighted_values`` per head
    logits = MLP([short, long, t])

On CUDA the short stage runs on a second stream beside the long one (:func:`cachestore.decode.capture.beside`; two
branches of a CUDA graph): its few programs fill the SMs that the long stage's latency-bound kernels leave idle.

No part is unpacked to tensors (the kernels read the keys' packed bytes in place too); the L of every intermediate is
the group's cap (the store's long_len), never the batch's longest history, so every shape is host-known.
Every store layout is read: separate or joint indices (a group's one ``kv_idx`` picks both rows of its joint pool,
:func:`group_pools`, and is read once per row), float or int8 user parts (codes × the checkpoint's scale,
:func:`cachestore.decode.fused_view.group_scales`); a store with a part that int8 codes of odd width push off a
2-byte boundary is refused, naming it (:func:`cachestore.decode.fused_view.check_half_layout`), except SDIM's long
V index, read byte by byte.
Pool rows are read at the store's precision unless ``FusedConfig.pool_dtype`` says otherwise
(:func:`group_pools`, cached on the resident per group and dtype). Parity with the model's own decode
(fp32 store, fp32 pools: up to fp32 summation order) and with the eager serving path:
``tests/cachestore/decode/test_fused_zoo.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from collectivekv.cachestore.decode.capture import beside
from collectivekv.cachestore.decode.decode import ResidentZooModel
from collectivekv.cachestore.decode.fused import (
    DEFAULT_FUSED,
    FusedConfig,
    attend_group,
    check_launch,
    pool_dtype,
    triton,
)
from collectivekv.cachestore.decode.fused_config import ALL_BYTES, check_chunks
from collectivekv.cachestore.decode.fused_mlp import mlp_logits
from collectivekv.cachestore.decode.fused_view import (
    GroupView,
    check_half_layout,
    group_scales,
    part_rows,
    record_part_starts,
    user_halves,
)
from collectivekv.cachestore.decode.fused_zoo_long import LONG_STAGES, LongStage, long_output, stage_buffers
from collectivekv.cachestore.decode.transfer import KV_TORCH
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.record import HEADER_SIZE, RouterIndexError
from collectivekv.model.cache_spec import entry_parts, group_specs, store_config
from collectivekv.model.config import ModelConfig
from collectivekv.model.retrieval import bitmask, sdim_buckets

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _part_starts_kernel(header_ptr, caps_ptr, rows_ptr, out_ptr, n_users, HEADER: tl.constexpr, P: tl.constexpr,
                            BLOCK: tl.constexpr):
        """out[p, b] = offsets[b] + HEADER + Σ_{i<p} min(n_b, cap_i)·row_bytes_i for p = 0 .. P (row P: one past
        the record), users b of this program's block; n_b = max(lengths[b], 0)."""
        b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        inside = b < n_users
        at = tl.load(header_ptr + b, mask=inside, other=0) + HEADER
        n = tl.maximum(tl.load(header_ptr + n_users + b, mask=inside, other=0), 0)
        tl.store(out_ptr + b, at, mask=inside)
        for p in tl.static_range(P):
            at += tl.minimum(n, tl.load(caps_ptr + p)) * tl.load(rows_ptr + p)
            tl.store(out_ptr + (p + 1) * n_users + b, at, mask=inside)


def record_starts(raw: torch.Tensor, layout: EntryLayout, n_users: int) -> torch.Tensor:
    """:func:`cachestore.decode.fused_view.record_part_starts` (P + 1, B) in ONE launch (a few torch ops there)."""
    caps, rows = part_rows(layout, raw.device)  # (P + 1, 1) each, a zero row first
    out = torch.empty(len(layout.parts) + 1, n_users, dtype=torch.int64, device=raw.device)
    if n_users:
        _part_starts_kernel[(-(-n_users // 128),)](raw[: 16 * n_users].view(torch.int64), caps[1:], rows[1:], out,
                                                   n_users, HEADER=HEADER_SIZE, P=len(layout.parts), BLOCK=128)
    return out


def part_starts(raw: torch.Tensor, layout: EntryLayout, n_users: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(byte start (B,) of every part of each record of the batch ``raw``, one past each record (B,)):
    part p of user b starts at offsets[b] + 32 + Σ_{q<p} min(n_b, cap_q)·row_bytes_q. No host sync: one launch on
    CUDA (:func:`record_starts`), torch ops elsewhere."""
    starts = record_starts if raw.is_cuda else record_part_starts
    at = starts(raw, layout, n_users)  # (P + 1, B)
    return {part.name: at[i] for i, part in enumerate(layout.parts)}, at[-1]


def entry_views(raw: torch.Tensor, layout: EntryLayout, n_users: int, cfg: ModelConfig,
                starts: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, GroupView]:
    """One :class:`GroupView` per K/V group (``group_specs(cfg)``, cfg: the store's config,
    :func:`model.cache_spec.store_config`) of the batch ``raw`` of ``n_users`` users (module docstring);
    every view's ``ends`` is the record's end. starts: :func:`part_starts` of the batch, if computed."""
    starts, ends = part_starts(raw, layout, n_users) if starts is None else starts
    lengths = raw[8 * n_users : 16 * n_users].view(torch.int64)  # (B,)
    pool_size = cfg.collective.pool_size
    return {g.name: GroupView(g, layout.kv_dtype, layout.idx_dtype, pool_size, starts[g.part_names()[0]],
                              lengths.clamp(max=g.cap), 0, ends, user_halves(layout, g))
            for g in group_specs(cfg)}  # fmt: skip


def check_store(resident: ResidentZooModel, layout: EntryLayout) -> ModelConfig:
    """The store's config (:func:`model.cache_spec.store_config`); ValueError unless ``layout`` is a store of
    this model's arch and parts (collective or full-KV; separate or joint indices, float or int8 user parts, each
    part where the kernels can read it: :func:`cachestore.decode.fused_view.check_half_layout`)."""
    cfg = resident.cfg
    if cfg.arch not in LONG_STAGES or layout.arch != cfg.arch:
        raise ValueError(f"zoo_static_decode serves {sorted(LONG_STAGES)} stores of the model's arch; "
                         f"model {cfg.arch!r}, store {layout.arch!r}")
    check_half_layout(layout, "zoo_static_decode")
    store_cfg = store_config(cfg, layout.mode)
    if tuple(layout.parts) != entry_parts(store_cfg):
        raise ValueError("the store's parts are not those of this model's cache")
    return store_cfg


def group_pools(resident: ResidentZooModel, group: str, shared: tuple[bool, bool], dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_k, P_v) of the model's TABlock ``group`` as (pool, d_a) rows zero in the d_u user dims, at ``dtype``
    (a joint index: the K and the V columns of the one joint pool, both picked by its kv_idx); a 1-row zero
    tensor for a side ``shared`` says is not shared. Cached on the resident per group and dtype."""
    cache: dict = resident.__dict__.setdefault("_zoo_pools", {})
    key = (group, shared, dtype)
    if key not in cache:
        block = getattr(resident.model, group)
        d_a = resident.cfg.d_attn

        def padded(branch: torch.nn.Module | None, is_shared: bool) -> torch.Tensor:
            pool = None if branch is None or not is_shared else branch.collective_pool()
            if pool is None:
                return torch.zeros(1, d_a, dtype=dtype, device=resident.device)
            pool = pool.detach()  # (M, d_a - d_u)
            return torch.cat([pool.new_zeros(pool.shape[0], d_a - pool.shape[1]), pool], 1).to(dtype).contiguous()
        cache[key] = (padded(block.k_branch, shared[0]), padded(block.v_branch, shared[1]))
    return cache[key]


def pool_keys(resident: ResidentZooModel) -> torch.Tensor:
    """(M,) int64 retrieval keys of a SIM / ETA resident's long K pool rows (``model.longseq.SIM.pool_codes``: the
    rows' genre sets; ``ETA.pool_codes``: their SimHash codes), on its device; cached on the resident (its pools
    are fixed while it is served)."""
    cache: dict = resident.__dict__.setdefault("_pool_keys", {})
    if "codes" not in cache:
        cache["codes"] = resident.model.pool_codes().to(resident.device)
    return cache["codes"]


def long_inputs(model: torch.nn.Module, cfg: ModelConfig, t: torch.Tensor, candidates: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the long stage needs of the candidates alone (t (B, C, E), ids (B, C)), computed before the batch is
    read: (q = W_q^long t (B, C, d_a) or None (SDIM), targets: SIM the genre bitmasks (B, C), ETA the SimHash codes
    (B, C), SDIM the buckets (B, C, m), TWIN None)."""
    q = None if cfg.arch == "sdim" else model.long.query(t)  # (B, C, d_a)
    if cfg.arch == "sim":
        return q, bitmask(model.item_genres[candidates], check=False)
    if cfg.arch == "eta":
        return q, model.target_codes(t, q)
    if cfg.arch == "sdim":
        return q, sdim_buckets(t, model.hash_planes)  # (B, C, m)
    return q, None


def zoo_static_decode(raw: torch.Tensor, candidates: torch.Tensor, *, resident: ResidentZooModel,
                      layout: EntryLayout, n_users: int, config: FusedConfig = DEFAULT_FUSED,
                      flags: torch.Tensor | None = None, chunks: Sequence[tuple[int, int]] = ALL_BYTES,
                      on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits (B, C) of ``candidates`` (B, C) int64 of users 0 .. B - 1 (B <= n_users) of the packed batch
    ``raw`` (uint8, on the resident's device, header at 0, zero block at 16·n_users: :mod:`cachestore.decode.batch`)
    for a SIM/ETA/SDIM/TWIN ``resident`` — ``LongSequenceCTR.decode`` from the bytes in place (module
    docstring), the attention kernels launched with ``config``. ``flags`` ((n_users,) int32): set to 1 for a
    user with a router index outside a pool (read as zeros); without it a ``RouterIndexError`` after a host
    sync. ``chunks`` (contiguous (lo, hi] byte ranges, din's): the short and long stages run once per chunk, each
    launch serving the users whose records end in it, after ``on_chunk(index)``; ``on_chunk(len(chunks))`` after
    the last (a CUDA graph copying the batch in pieces makes launch c wait for piece c there, so the candidates'
    own work — embedding, queries, retrieval targets — runs beside the copy and each piece's stages beside the
    next piece's copy: :class:`cachestore.decode.graphs.GraphedDecoder`). The record starts are computed once,
    after the first piece (which holds the batch header). Shape-static and free of host syncs when ``flags`` is
    given. Call under ``torch.inference_mode()``."""
    cfg = resident.cfg
    store_cfg = _check_inputs(raw, candidates, resident, layout, n_users, config, chunks)
    if len(chunks) > 1:  # a launch writes its users' rows only: never split a history (the combine writes all)
        config = replace(config, split_l=1)
    flag = torch.zeros(n_users, dtype=torch.int32, device=raw.device) if flags is None else flags
    model = resident.model
    b, c = candidates.shape
    dtype = KV_TORCH[pool_dtype(config, layout)]
    groups = {g.name: g for g in group_specs(store_cfg)}
    pools = {name: group_pools(resident, name, (g.k_shared, g.v_shared), dtype) for name, g in groups.items()}
    scales = {name: group_scales(resident, g) for name, g in groups.items()}
    t = model.item_embedding(candidates)  # (B, C, E)
    q_short = model.short.query(t)  # (B, C, d_a)
    q_long, targets = long_inputs(model, cfg, t, candidates)
    codes = pool_keys(resident) if store_cfg.pool_keys and cfg.arch in ("sim", "eta") else None  # SDIM: in the index
    buffers = stage_buffers(cfg, b, c, groups["long"].cap, raw.device)
    short = buffers["short"]  # (B, C, d_a)
    batch = _BatchViews()
    for index, chunk in enumerate(chunks):
        if on_chunk is not None:
            on_chunk(index)  # the batch is read from here on (pieces 0 .. index have landed)
        starts, views = batch.at(raw, layout, n_users, store_cfg), batch.groups
        main, side = beside(raw.device, index)
        with torch.cuda.stream(side):  # the short stage beside the long one (no-op for side None: CPU)
            attend_group(raw, q_short, views["short"], pools["short"], cfg.n_heads, flag, config=config,
                         chunks=(chunk,), scales=scales["short"], out=short)
        LONG_STAGES[cfg.arch](LongStage(model, cfg, layout, store_cfg, raw, q_long, targets, views["long"],
                                        pools["long"], starts, flag, config, scales["long"], buffers, codes, chunk))
        if side is not None:
            main.wait_stream(side)  # join: this launch's stages are done when its stream is
    if on_chunk is not None:
        on_chunk(len(chunks))
    long = long_output(cfg, buffers, b, c)  # (B, C, d_a)
    logits = mlp_logits(model.mlp, [short.to(t.dtype), long.to(t.dtype), t])  # (B, C)
    if flags is None and bool(flag.any()):
        raise RouterIndexError(f"a router index outside the pool 0..{cfg.collective.pool_size - 1} in batch row "
                               f"{int(torch.nonzero(flag)[0, 0])}: the record is corrupt "
                               "(run `ckv store verify STORE`)")
    return logits


def _check_inputs(raw: torch.Tensor, candidates: torch.Tensor, resident: ResidentZooModel, layout: EntryLayout,
                  n_users: int, config: FusedConfig, chunks: Sequence[tuple[int, int]]) -> ModelConfig:
    """The store's config; RuntimeError without Triton, ValueError for another store, a launch the kernels cannot
    run, candidates that are not (B <= n_users, C) on the batch's device, or chunks that do not partition it."""
    if triton is None:
        raise RuntimeError("the fused zoo decode needs Triton (pip install triton), or use the eager path")
    store_cfg = check_store(resident, layout)
    check_launch(resident.cfg.n_heads, resident.cfg.d_attn, config)
    if candidates.dim() != 2 or candidates.shape[0] > n_users:
        raise ValueError(f"candidates {tuple(candidates.shape)}: want (B, C) with B <= {n_users} users")
    if raw.device != candidates.device:
        raise ValueError(f"the packed batch is on {raw.device}, the candidates on {candidates.device}")
    check_chunks(chunks, raw)
    return store_cfg


class _BatchViews:
    """A batch's part starts and group views, computed by the first launch (its piece holds the batch header) on
    its stream, which records an event that later launches — maybe on streams of their own — wait for."""

    def __init__(self) -> None:
        self.starts: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None
        self.groups: dict[str, GroupView] = {}
        self.ready: torch.cuda.Event | None = None

    def at(self, raw: torch.Tensor, layout: EntryLayout, n_users: int, store_cfg: ModelConfig
           ) -> dict[str, torch.Tensor]:
        """Every part's byte start (B,) for a launch on the current stream (the first computes them)."""
        if self.starts is None:
            self.starts = part_starts(raw, layout, n_users)
            self.groups = entry_views(raw, layout, n_users, store_cfg, self.starts)
            if raw.is_cuda:
                self.ready = torch.cuda.Event()
                self.ready.record(torch.cuda.current_stream(raw.device))
        elif self.ready is not None:
            torch.cuda.current_stream(raw.device).wait_event(self.ready)
        return self.starts[0]
