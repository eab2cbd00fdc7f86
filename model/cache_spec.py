"""What one user's cache entry holds, for a model config: the single, torch-free source of truth.

Every model caches one *entry* per user: a flat, ordered list of named parts (:class:`EntryPart`).
A user with ``n`` cached behaviours (``n <= cfg.window_len``) has, for every part ``p``,
``min(n, p.cap)`` rows of ``p.width`` values of ``p.kind``:

====  =====================================  ==============================================
kind  values                                 stored as
====  =====================================  ==============================================
kv    user-specific K or V part (the whole   the store's kv dtype (2 or 4 bytes)
      K/V in the full-KV store)
q8    user-specific K or V part of a shared  int8 codes (1 byte); value = code × the branch's
      side with ``user_dtype == "int8"``     fp32 scale, held by the model's checkpoint
idx   router index into the group's pool     uint16 while the pool has <= 65,536 rows, else int32
key   retrieval key, bit-packed little-      ``width = ceil(bits / 8)`` bytes
      endian into ``width`` bytes
====  =====================================  ==============================================

Parts come group by group (:func:`group_specs` order) as ``k_user, v_user, k_idx, v_idx``, then the
retrieval keys; zero-width parts (SDIM's long stage has no K; with keys from its index, no V user part either:
:func:`long_v_user`) are left out. With ``kv_index == "joint"``
a group with a K has one index part ``kv_idx`` instead of ``k_idx, v_idx``: a row of the group's joint pool
holding both collective parts (SDIM's V-only long group keeps its ``v_idx``). "Half the cache" (din, d_u 1,
pool <= 65,536, joint + int8): ``kv.k_user`` (q8, 1 B) | ``kv.v_user`` (q8, 1 B) | ``kv.kv_idx`` (uint16, 2 B)
= 4 bytes per behaviour, CR 4 / 2048 = 0.195% (separate + float16: 8 bytes, 0.39%). A group of ``cap`` rows
caches the *last* ``min(n, cap)`` behaviours of the user's window. ``din`` is the one-group entry
``kv.k_user | kv.v_user | kv.k_idx | kv.v_idx`` of cap ``max_len``.

Sizes (:func:`entry_bytes`, :func:`full_kv_bytes`, :func:`compression_rate`) are computed from these
parts only: CR = bytes of a user's entry ÷ bytes of the same user's K/V in the *full* model at fp32
(retrieval keys are not K/V, so they count in the numerator only). Record format, prefill, size
report, capacity planner and the README's CR formula all read this module; it imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from collectivekv.model.config import LONG_ARCHS, ModelConfig

KINDS = ("kv", "idx", "key", "q8")
FULL_KV_ITEMSIZE = 4  # the CR denominator: the full model's K/V at fp32


@dataclass(frozen=True)
class EntryPart:
    """One named block of an entry: ``min(n, cap)`` rows of ``width`` values of ``kind``."""

    name: str  # "<group>.k_user" | "<group>.v_user" | "<group>.{k,v,kv}_idx" | "keys.<name>"
    kind: str  # "kv" | "q8" | "idx" | "key"
    width: int  # values per row (key: packed bytes)
    cap: int  # most rows a user has

    def rows(self, n: int) -> int:
        return min(n, self.cap)


@dataclass(frozen=True)
class GroupSpec:
    """One cached K/V group: the last ``min(n, cap)`` behaviours, K of ``dk`` and V of ``dv`` values per
    row (``dk == 0``: a V-only group; ``dv == 0``: a V of pool rows alone, no ``v_user`` part), each side with a
    router index when it is shared — one index for both (``kv_idx``) when ``joint`` — and, ``int8_user``, the shared
    sides' user parts as int8 codes (kind q8)."""

    name: str
    cap: int
    dk: int
    dv: int
    k_shared: bool
    v_shared: bool
    joint: bool = False
    int8_user: bool = False

    @property
    def has_k(self) -> bool:
        return self.dk > 0

    def part_names(self) -> tuple[str, ...]:
        """This group's parts, in entry order."""
        names = [f"{self.name}.k_user"] if self.has_k else []
        if self.dv:  # dv 0: a V of pool rows alone (SDIM keyed by its index) has no user part
            names.append(f"{self.name}.v_user")
        if self.joint:
            names.append(f"{self.name}.kv_idx")
            return tuple(names)
        if self.has_k and self.k_shared:
            names.append(f"{self.name}.k_idx")
        if self.v_shared:
            names.append(f"{self.name}.v_idx")
        return tuple(names)

    def user_kind(self, side: str) -> str:
        """Part kind of the ``side`` ("k" | "v") user part: "q8" for a shared side of an int8 group, else "kv"."""
        shared = self.k_shared if side == "k" else self.v_shared
        return "q8" if self.int8_user and shared else "kv"

    def idx_part(self, side: str) -> str | None:
        """The name of the index part ``side``'s rows are read with (``kv_idx`` when joint), None if unshared."""
        if not (self.k_shared if side == "k" else self.v_shared):
            return None
        return f"{self.name}.kv_idx" if self.joint else f"{self.name}.{side}_idx"


def index_itemsize(pool_size: int) -> int:
    """Bytes per stored router index: 2 (uint16) while the pool has <= 65,536 rows, else 4."""
    return 2 if pool_size <= 65_536 else 4


def index_dtype(pool_size: int) -> str:
    """The stored router-index dtype name for a pool of ``pool_size`` rows."""
    return "uint16" if index_itemsize(pool_size) == 2 else "int32"


def store_config(cfg: ModelConfig, store_mode: str) -> ModelConfig:
    """The config whose parts a store of ``store_mode`` holds: the model's own for "collective",
    ``kv_mode="full"`` (whole K/V, no indices) for the full-KV store."""
    if store_mode not in ("collective", "full"):
        raise ValueError(f"store mode must be 'collective' or 'full', got {store_mode!r}")
    return replace(cfg, kv_mode="full") if store_mode == "full" else cfg


def group_specs(cfg: ModelConfig) -> tuple[GroupSpec, ...]:
    """The cached K/V groups of ``cfg`` in entry order: din ``kv``; sim/eta/sdim/twin ``short``
    (cap min(max_len, long_len)) and ``long`` (cap long_len; V only for sdim, of :func:`long_v_user` dims);
    hstu ``layer<i>``."""
    full = cfg.kv_mode == "full"
    dk = cfg.d_attn if full else cfg.dk_user
    dv = cfg.d_attn if full else cfg.dv_user
    if cfg.arch in LONG_ARCHS:
        long_dv = dv if full else long_v_user(cfg)
        caps = [("short", min(cfg.max_len, cfg.long_len), True, dv),
                ("long", cfg.long_len, cfg.arch != "sdim", long_dv)]
    elif cfg.arch == "hstu":
        caps = [(f"layer{i}", cfg.max_len, True, dv) for i in range(cfg.hstu_layers)]
    else:
        caps = [("kv", cfg.max_len, True, dv)]
    return tuple(GroupSpec(name, cap, dk if has_k else 0, dv_g, cfg.k_shared and has_k, cfg.v_shared,
                           cfg.joint_index and has_k and not full, cfg.int8_user and not full and dv_g > 0)
                 for name, cap, has_k, dv_g in caps)  # fmt: skip


def long_v_user(cfg: ModelConfig) -> int:
    """User dims of the long group's V: 0 for SDIM keyed by its router index (the 16-bit index holds the bucket
    code and the row; no byte is left for a user part), else ``cfg.dv_user``."""
    return 0 if cfg.arch == "sdim" and cfg.pool_keys else cfg.dv_user


def key_blocks(cfg: ModelConfig) -> int:
    """Index blocks of SDIM keyed by its router index: one per bucket code, 2^(sdim_hashes · sdim_bits); 1 else
    (SIM's blocks are its items' genre sets: :class:`model.longseq.SIM`)."""
    return 1 << (cfg.sdim_hashes * cfg.sdim_bits) if cfg.arch == "sdim" and cfg.pool_keys else 1


def key_bits(cfg: ModelConfig) -> int:
    """Bits of SIM's key (a genre bitmask, bit g-1 for genre g) or ETA's (a SimHash signature); 0 for the others."""
    return {"sim": max(1, cfg.n_genres), "eta": cfg.hash_bits}.get(cfg.arch, 0)


def key_fields(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Retrieval keys of ``cfg.arch``: name → (values per behaviour, bits per value); none for SIM / ETA / SDIM keyed
    by their router indices (:attr:`model.config.ModelConfig.pool_keys`: the index is the key)."""
    if cfg.pool_keys:
        return {}
    if cfg.arch in ("sim", "eta"):
        return {"categories" if cfg.arch == "sim" else "simhash": (1, key_bits(cfg))}
    if cfg.arch == "sdim":
        return {"buckets": (cfg.sdim_hashes, cfg.sdim_bits)}
    return {}


def entry_parts(cfg: ModelConfig) -> tuple[EntryPart, ...]:
    """The parts of one user's entry for ``cfg`` (see the module docstring for order and rows)."""
    parts: list[EntryPart] = []
    for g in group_specs(cfg):
        for name in g.part_names():
            attr = name.split(".", 1)[1]
            kind = "idx" if attr.endswith("_idx") else g.user_kind(attr[0])
            width = 1 if kind == "idx" else (g.dk if attr == "k_user" else g.dv)
            parts.append(EntryPart(name, kind, width, g.cap))
    for name, (m, bits) in key_fields(cfg).items():
        parts.append(EntryPart(f"keys.{name}", "key", math.ceil(m * bits / 8), cfg.long_len))
    return tuple(parts)


def part_itemsizes(cfg: ModelConfig, kv_itemsize: int = 2) -> dict[str, int]:
    """Bytes per value of each part kind: kv at ``kv_itemsize``, idx at :func:`index_itemsize`, key and q8 1."""
    return {"kv": kv_itemsize, "idx": index_itemsize(cfg.collective.pool_size), "key": 1, "q8": 1}


def entry_bytes(cfg: ModelConfig, n: int | None = None, kv_itemsize: int = 2) -> int:
    """Payload bytes of one user's entry with ``n`` behaviours (default: a full window). The full
    model (``kv_mode="full"``) counts its K/V at fp32 (the baseline); collective user parts count at
    ``kv_itemsize``; router indices at their integer width; retrieval keys packed to whole bytes."""
    n = cfg.window_len if n is None else n
    size = part_itemsizes(cfg, FULL_KV_ITEMSIZE if cfg.kv_mode == "full" else kv_itemsize)
    return sum(p.rows(n) * p.width * size[p.kind] for p in entry_parts(cfg))


def bytes_per_behaviour(cfg: ModelConfig, kv_itemsize: int = 2) -> float:
    """Mean payload bytes per cached behaviour of a full window (din: exactly the bytes of one row)."""
    return entry_bytes(cfg, None, kv_itemsize) / max(1, cfg.window_len)


def key_bytes_per_behaviour(cfg: ModelConfig) -> int:
    """Retrieval-key bytes per long-window behaviour (bits packed to whole bytes)."""
    return sum(p.width for p in entry_parts(cfg) if p.kind == "key")


def full_kv_bytes(cfg: ModelConfig, n: int | None = None) -> int:
    """Bytes of the same user's K/V in the full model at fp32 (the CR denominator)."""
    n = cfg.window_len if n is None else n
    groups = group_specs(replace(cfg, kv_mode="full"))
    return sum(min(n, g.cap) * (g.dk + g.dv) * FULL_KV_ITEMSIZE for g in groups)


def compression_rate(cfg: ModelConfig, n: int | None = None, kv_itemsize: int = 2) -> float:
    """CR of a user with ``n`` history behaviours (default: a full window): :func:`entry_bytes` ÷
    :func:`full_kv_bytes`. For ``din``: bytes per behaviour ÷ (2 · d_a · 4)."""
    return entry_bytes(cfg, n, kv_itemsize) / max(1, full_kv_bytes(cfg, n))


# ---------------------------------------------------------------------------------- token-table alternative


def token_only_reason(cfg: ModelConfig) -> str | None:
    """None when every cached part of ``cfg`` is a function of the behaviour's token alone (item, its genres,
    the feedback and, with per-event features, the event's code): din and the target-attention zoo (SIM, ETA,
    SDIM, TWIN), whose K/V, router indices and retrieval keys come from the token's embedding. Otherwise why
    not: HSTU's layers above the first attend over the sequence, so their K/V depend on the whole history, not
    on the token. Bucketed per-event features keep a token table possible but multiply its vocabulary by the
    number of event codes (:func:`token_vocabulary`)."""
    if cfg.arch == "hstu":
        return (f"HSTU's K/V above layer 0 are contextual (each of its {cfg.hstu_layers} layers attends over the "
                "history): they depend on the event's position and neighbours, not on its token alone")
    return None


def token_vocabulary(cfg: ModelConfig) -> int:
    """Distinct behaviour tokens a token table must hold: every item with every feedback id (negative or
    positive, times the event codes of per-event features: ``cfg.n_feedback - 1``)."""
    return cfg.n_items * (cfg.n_feedback - 1)


def token_id_itemsize(vocabulary: int) -> int:
    """Bytes of one token id in a token-id store: uint16 while the vocabulary fits, else int32."""
    return 2 if vocabulary <= 65_536 else 4


def token_row_bytes(cfg: ModelConfig, store_mode: str, kv_itemsize: int = 2) -> int:
    """Bytes of one token's row in a GPU token table holding what a ``store_mode`` store caches per
    behaviour: one row of every group (K/V at ``kv_itemsize``, router indices) and its retrieval keys."""
    c = store_config(cfg, store_mode)
    size = part_itemsizes(c, kv_itemsize)
    return sum(p.width * size[p.kind] for p in entry_parts(c))
