"""The K (or V) branch of a model: a user-specific projection, plus for CollectiveKV a router
and a learnable global pool — or, with ``kv_index == "joint"``, one :class:`JointRouter` whose index picks a
row of one pool holding both sides' collective parts (K's first, then V's).

Routing runs once per *distinct* behaviour token in the batch rather than once per behaviour:
the router input is a function of the token alone (item, feedback), so the logits, indices and
count-weighted losses are exactly those of the per-behaviour computation at a fraction of the
cost of the (N, pool_size) logits. ``tests/model/test_model.py`` checks this against the plain reference.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from collectivekv.model.config import ModelConfig
from collectivekv.model.quant import check_scale, fake_quant, observe_scale
from collectivekv.model.routing import fused_route, peak_loss, route


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch of behaviours as its distinct tokens.

    valid: (B, L) bool; x_unique: (U, E) embedding of each distinct valid token; inverse: (N,)
    row of x_unique for each valid position, in ``valid.nonzero()`` order; counts: (U,)
    occurrences of each distinct token. Every per-behaviour quantity that is a function of the
    token alone (projections, router logits) is computed on the U rows and spread to (B, L).
    """

    valid: torch.Tensor
    x_unique: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    positions: torch.Tensor  # (N,) flat index b * L + l of each valid position
    items: torch.Tensor | None = None  # (U,) item id of each distinct token (None: tokens that are not items)
    # (U,) int64 added to each distinct token's router index: the first index of its block in a blocked pool
    # (:func:`block_table`; SIM / SDIM keyed by their router index); None: 0
    row_offset: torch.Tensor | None = None

    def spread(self, per_token: torch.Tensor) -> torch.Tensor:
        """(U, ...) per-token values → (B, L, ...) per position, zeros at padding."""
        rows = torch.index_select(per_token, 0, self.inverse)  # (N, ...)
        out = rows.new_zeros(self.valid.numel(), *rows.shape[1:])  # (B·L, ...)
        out = out.index_copy(0, self.positions, rows)  # (B·L, ...)
        return out.reshape(*self.valid.shape, *rows.shape[1:])  # (B, L, ...)


@dataclass(frozen=True)
class BranchState:
    """One branch's prefill output: user part (B, L, d), pool index and gate (B, L) or None,
    and its router losses (scalars; zero when not shared)."""

    user: torch.Tensor
    idx: torch.Tensor | None
    gate: torch.Tensor | None
    peak: torch.Tensor
    balance: torch.Tensor


@dataclass(frozen=True)
class Routed:
    """A router's decisions for a token batch: idx, gate (B, L) (gate None on the hard path) and its losses."""

    idx: torch.Tensor
    gate: torch.Tensor | None
    peak: torch.Tensor
    balance: torch.Tensor


def route_tokens(router: nn.Linear, tokens: TokenBatch, soft: bool,
                 probe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Routed:
    """Hard (argmax, zero losses) or soft (gate + peak and balance losses) routing of every distinct token,
    spread to (B, L) — the paper's math (:mod:`model.routing`), once per distinct token."""
    offset = 0 if tokens.row_offset is None else tokens.row_offset  # (U,) or 0
    if not soft:
        logits = router(tokens.x_unique)  # (U, S)
        if probe is not None:
            probe(logits, tokens.counts)
        zero = logits.new_zeros(())
        return Routed(tokens.spread(route(logits).idx + offset), None, zero, zero)
    routing, balance = fused_route(tokens.x_unique, router.weight, tokens.counts)
    peak = peak_loss(routing.top_logit, tokens.counts)
    return Routed(tokens.spread(routing.idx + offset), tokens.spread(routing.gate), peak, balance)


def block_table(rows: torch.Tensor, blocks: int, index_rows: int) -> torch.Tensor:
    """The (index_rows, d) table a blocked pool's indices read: ``blocks`` blocks of S = index_rows // blocks index
    values, each block holding the same S shared rows ``rows`` (S, d), then zero rows up to ``index_rows`` (no index
    reads them). Index ``b·S + j`` reads row j: the block carries what the index names beyond the row (keys from the
    router index: SIM's genre set, SDIM's bucket code). ``rows`` itself when ``blocks == 1``."""
    if blocks == 1:
        return rows
    table = rows.repeat(blocks, 1)  # (blocks·S, d)
    return torch.nn.functional.pad(table, (0, 0, 0, index_rows - table.shape[0]))  # (index_rows, d)


def router_width(model: nn.Module) -> int:
    """The widest router of ``model`` (logits per token: the pool rows it routes over, S of a blocked pool), 1 if it
    has none — what sizes a prefill's chunks."""
    widths = [m.router.out_features for m in model.modules()
              if isinstance(m, (KVBranch, JointRouter)) and m.router is not None]
    return max(widths, default=1)


class BlockTables:
    """The block table of a module's pool (:func:`block_table`), kept while no gradient is being recorded and the
    pool is unchanged (the same tensor, by a weak reference, at the same version, storage, dtype and device: an
    optimizer step, ``load_state_dict`` and ``.to()`` each make a new table; an edit through ``.data`` is not seen), so
    inference does not rebuild a (pool_size, d) table per call; built afresh under autograd (training reads the
    pool's current rows)."""

    def __init__(self) -> None:
        self.source: Callable[[], torch.Tensor | None] = lambda: None  # a weak reference to the pool it was built from
        self.key: tuple | None = None
        self.table: torch.Tensor | None = None

    def get(self, rows: torch.Tensor, blocks: int, index_rows: int) -> torch.Tensor:
        if blocks == 1 or torch.is_grad_enabled():
            return block_table(rows, blocks, index_rows)
        version = None if rows.is_inference() else rows._version  # inference tensors keep no version counter
        key = (version, rows.data_ptr(), rows.dtype, rows.device, blocks, index_rows)  # .to() / .double() move it
        if self.table is None or self.source() is not rows or self.key != key:
            self.table, self.key, self.source = block_table(rows.detach(), blocks, index_rows), key, weakref.ref(rows)
        return self.table


def block_rows(pool_size: int, blocks: int) -> int:
    """Shared rows S of a pool of ``pool_size`` index values in ``blocks`` blocks (:func:`block_table`)."""
    if not 1 <= blocks <= pool_size:
        raise ValueError(f"a pool of {pool_size} index values holds at most {pool_size} blocks, got {blocks} (keys "
                         "from the router index: a block per SIM genre set or SDIM bucket code; raise --pool-size, "
                         "up to 65,536)")
    return pool_size // blocks


class JointRouter(nn.Module):
    """One router and one pool for a K and a V branch (``kv_index == "joint"``): a behaviour's one index picks
    row of shape ((d_a - dk_u) + (d_a - dv_u),) of its pool (of its block table, :func:`block_table`, when blocked):
    K's collective part is its first d_a - dk_u values, V's the rest. Gate, peak and balance losses are computed once
    per behaviour."""

    def __init__(self, embed_dim: int, d_attn: int, dk_user: int, dv_user: int, pool_size: int, blocks: int = 1
                 ) -> None:
        super().__init__()
        rows = block_rows(pool_size, blocks)
        self.router = nn.Linear(embed_dim, rows, bias=False)
        self.pool = nn.Parameter(torch.randn(rows, (d_attn - dk_user) + (d_attn - dv_user)))
        self.k_width = d_attn - dk_user
        self.blocks, self.index_rows, self.tables = blocks, pool_size, BlockTables()
        self.probe: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def side_pool(self, side: str) -> torch.Tensor:
        """(M, d_a - d_u) rows the index reads (:func:`block_table`): K's columns (``side`` "k") or V's ("v")."""
        table = self.tables.get(self.pool, self.blocks, self.index_rows)
        return table[:, : self.k_width] if side == "k" else table[:, self.k_width :]

    def route(self, tokens: TokenBatch, soft: bool) -> Routed:
        return route_tokens(self.router, tokens, soft, self.probe)


class KVBranch(nn.Module):
    """Computes the cacheable parts of K (or V).

    Not shared: ``user = W x`` with W: E → d_a (the full-KV baseline).
    Shared: ``user = SiLU(W x)`` with W: E → d_u (as in the authors' code), and
    ``idx = argmax(router(x))`` into ``pool`` of shape (S, d_a - d_u) (S = pool_size, or the shared rows of a blocked
    pool, whose index is the token's block start + the argmax: :func:`block_table`) — or, ``joint``, the index and
    pool columns of a :class:`JointRouter` (attached by :func:`kv_branches`; the branch then has no router or
    pool of its own). ``int8`` (shared only): the user part is fake-quantised with the buffer ``user_scale``
    (:mod:`model.quant`).
    """

    def __init__(self, embed_dim: int, d_attn: int, shared: bool, d_user: int, pool_size: int,
                 joint: bool = False, int8: bool = False, blocks: int = 1) -> None:
        super().__init__()
        self.shared = shared
        width = d_user if shared else d_attn
        self.proj = nn.Linear(embed_dim, width, bias=False) if width else None  # None: a V of pool rows alone
        self.blocks, self.index_rows, self.tables = blocks, pool_size, BlockTables()
        if shared and not joint:
            rows = block_rows(pool_size, blocks)
            self.router: nn.Linear | None = nn.Linear(embed_dim, rows, bias=False)
            self.pool: nn.Parameter | None = nn.Parameter(torch.randn(rows, d_attn - d_user))
        else:
            self.router = None
            self.pool = None
        self.int8 = shared and int8
        if self.int8:
            self.register_buffer("user_scale", torch.zeros((), dtype=torch.float32))  # 0: not observed yet
        # the JointRouter and this branch's side ("k" | "v") when joint: a plain reference (the module owning
        # both branches registers the router), set by :func:`kv_branches`
        self.joint: tuple[JointRouter, str] | None = None
        # called with the router logits (U, S) and token counts (U,) of every hard-routed prefill while
        # a :class:`model.diagnostics.RoutingProbe` is attached; None otherwise (no cost)
        self.probe: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def collective_pool(self) -> torch.Tensor | None:
        """(M, d_a - d_u) collective rows this branch's index reads: its own pool (through :func:`block_table`) or its
        joint pool's columns."""
        if self.joint is not None:
            return self.joint[0].side_pool(self.joint[1])
        return None if self.pool is None else self.tables.get(self.pool, self.blocks, self.index_rows)

    def routing_weight(self) -> torch.Tensor | None:
        """(S, E) weight of the router that picks this branch's rows (its own or the joint one's)."""
        if self.joint is not None:
            return self.joint[0].router.weight
        return None if self.router is None else self.router.weight

    def quantise(self, user: torch.Tensor) -> torch.Tensor:
        """(U, d_u) shared user part → its int8 fake-quantised value (training: after observing the scale)."""
        if not self.int8:
            return user
        if self.training:
            observe_scale(self.user_scale, user)
        else:
            check_scale(self.user_scale, "KVBranch")
        return fake_quant(user, self.user_scale)

    def prefill(self, tokens: TokenBatch, soft: bool, routed: Routed | None = None) -> BranchState:
        """User part, indices and (if ``soft``) gates for every position; padding → 0. ``routed``: the joint
        router's decisions (required for a joint branch, whose losses the caller counts once)."""
        x = tokens.x_unique
        user_u = x.new_zeros(x.shape[0], 0) if self.proj is None else self.proj(x)  # (U, d)
        zero = user_u.new_zeros(())
        if not self.shared:
            return BranchState(tokens.spread(user_u), None, None, zero, zero)
        user = tokens.spread(self.quantise(nn.functional.silu(user_u)))  # (B, L, d_u)
        if routed is None:
            if self.router is None:
                raise ValueError("a joint K/V branch is routed by its JointRouter: use prefill_pair")
            routed = route_tokens(self.router, tokens, soft, self.probe)
            return BranchState(user, routed.idx, routed.gate, routed.peak, routed.balance)
        return BranchState(user, routed.idx, routed.gate, zero, zero)


def kv_branches(cfg: ModelConfig, has_k: bool = True, blocks: int = 1, v_user: int | None = None
                ) -> tuple[KVBranch | None, KVBranch, JointRouter | None]:
    """The K branch (None when ``has_k`` is False: a V-only block), the V branch and, for ``cfg.joint_index``
    with a K, the :class:`JointRouter` both read (the caller registers it, as ``kv_router``); their pools in
    ``blocks`` blocks (:func:`block_table`). ``v_user``: the shared V's user dims instead of ``d_user`` (0: the V
    is its pool row alone; a V-only block)."""
    e, d_a, c = cfg.embed_dim, cfg.d_attn, cfg.collective
    joint = cfg.joint_index and has_k
    dv = c.d_user if v_user is None else v_user
    k = KVBranch(e, d_a, cfg.k_shared, c.d_user, c.pool_size, joint, cfg.int8_user, blocks) if has_k else None
    v = KVBranch(e, d_a, cfg.v_shared, dv, c.pool_size, joint, cfg.int8_user and dv > 0, blocks)
    if not joint:
        return k, v, None
    router = JointRouter(e, d_a, cfg.dk_user, cfg.dv_user, c.pool_size, blocks)
    assert k is not None
    k.joint, v.joint = (router, "k"), (router, "v")
    return k, v, router


def prefill_pair(k_branch: KVBranch | None, v_branch: KVBranch, tokens: TokenBatch, soft: bool
                 ) -> tuple[BranchState | None, BranchState]:
    """Both branches' prefill; a joint pair is routed once (its losses on the K state, zero on the V state)."""
    if k_branch is None or k_branch.joint is None:
        k = None if k_branch is None else k_branch.prefill(tokens, soft)
        return k, v_branch.prefill(tokens, soft)
    routed = k_branch.joint[0].route(tokens, soft)
    k = k_branch.prefill(tokens, soft, routed)
    k = BranchState(k.user, k.idx, k.gate, routed.peak, routed.balance)
    return k, v_branch.prefill(tokens, soft, routed)
