"""A zoo model's per-user cache entry as a flat list of named parts (pure tensors, no I/O).

The store (``cachestore.store.entry``) writes one user's entry as a sequence of byte blocks; this module
says which blocks a model's cache has and converts between a :class:`model.blocks.ZooCache` and
those blocks. One user with ``n`` cached behaviours (``n <= cfg.window_len``) has, for every part
``p`` of :func:`entry_parts`, ``min(n, p.cap)`` rows of ``p.width`` values:

====  =====================================  ============================================================
kind  values                                 tensor in :func:`entry_arrays` / :func:`cache_from_arrays`
====  =====================================  ============================================================
kv    user-specific K or V part (or the      (B, R, width) float (stored at the layout's kv dtype)
      whole K/V in the full model)
q8    int8 code of a shared side's user      (B, R, width) int8 codes; :func:`cache_from_arrays` turns them into
      part (``user_dtype == "int8"``)        fp32 ``code · scale`` (scales: :func:`user_scales`)
idx   router index into the group's pool     (B, R, 1) int64 (stored uint16 or int32)
key   retrieval key, bit-packed little-      (B, R, width) uint8: ``width = ceil(bits / 8)`` bytes
      endian into ``width`` bytes
====  =====================================  ============================================================

R = ``min(max(lengths), cap)`` (valid rows first, zeros at padding). Parts are ordered group by
group (``model.zoo.cache_groups`` order) as ``k_user, v_user, k_idx, v_idx`` (``kv_idx`` for both with a joint
index: the cache's ``k_idx`` and ``v_idx`` are then the same tensor), then the retrieval keys; zero-width
parts (SDIM's long stage has no K) are left out. A group of ``positions`` rows at a
full window caches the *last* ``min(n, cap)`` behaviours of the user's window, so rows(n) =
``min(n, cap)`` for every part. The ``din`` arch's parts are its one group
(``kv.k_user | kv.v_user | kv.k_idx | kv.v_idx``, cap ``max_len``).

Keys: SIM's category bitmask (``n_genres`` bits), ETA's SimHash signature (``hash_bits``) and SDIM's
``sdim_hashes`` bucket ids of ``sdim_bits`` each (id j at bits ``j·sdim_bits``) — the bytes that
``model.zoo.key_bytes_per_behaviour`` counts.
"""

from __future__ import annotations

import math

import torch

from collectivekv.model.blocks import ZooCache
from collectivekv.model.cache import KVCache
from collectivekv.model.cache_spec import GroupSpec, entry_parts, group_specs, key_fields
from collectivekv.model.config import ModelConfig
from collectivekv.model.pool import KVBranch
from collectivekv.model.quant import dequantise, int8_codes


def pack_keys(keys: torch.Tensor, m: int, bits: int) -> torch.Tensor:
    """(B, L) or (B, L, m) non-negative int64 keys → (B, L, ceil(m·bits/8)) uint8, little-endian,
    value j of a row at bits ``j·bits``."""
    if m * bits > 63:
        raise ValueError(f"retrieval keys of {m}x{bits} bits do not fit in 63 bits")
    k = keys.to(torch.int64)
    if k.dim() == 2:
        k = k.unsqueeze(-1)  # (B, L, 1)
    shifts = torch.arange(m, device=k.device, dtype=torch.int64) * bits  # (m,)
    word = (k << shifts).sum(-1)  # (B, L): the values are < 2**bits, so sum == bitwise or
    raw = word.contiguous().unsqueeze(-1).view(torch.uint8)  # (B, L, 8), little-endian bytes
    if raw.shape[-1] != 8 or int.from_bytes(b"\x01\x00", "little") != 1:  # pragma: no cover
        raise RuntimeError("unexpected int64 byte view")
    return raw[..., : math.ceil(m * bits / 8)].contiguous()


def unpack_keys(packed: torch.Tensor, m: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_keys`: (B, L, nbytes) uint8 → (B, L) int64 (m = 1) or (B, L, m)."""
    b, length, nbytes = packed.shape
    raw = torch.zeros(b, length, 8, dtype=torch.uint8, device=packed.device)
    raw[..., :nbytes] = packed
    word = raw.view(torch.int64).squeeze(-1)  # (B, L)
    if m == 1:
        return word
    shifts = torch.arange(m, device=packed.device, dtype=torch.int64) * bits  # (m,)
    return (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (B, L, m)


def group_branches(model: torch.nn.Module, group: str) -> tuple[KVBranch | None, KVBranch]:
    """The (K, V) branches of a model's K/V group: din ``kv`` (the model), ``short``/``long`` (its TABlocks),
    HSTU ``layer<i>``."""
    owner = model if group == "kv" else model.layers[int(group[5:])] if group.startswith("layer") else (
        getattr(model, group))
    return owner.k_branch, owner.v_branch


def user_scales(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, float]:
    """The fp32 scale of every int8 (q8) user part of ``cfg``'s entry: part name → the branch's ``user_scale``
    (empty for a float cache). What the store's codes are decoded with."""
    out: dict[str, float] = {}
    for g in group_specs(cfg):
        for side, branch in zip("kv", group_branches(model, g.name), strict=True):
            if g.user_kind(side) == "q8":
                assert branch is not None
                out[f"{g.name}.{side}_user"] = float(branch.user_scale)
    return out


def _scale(scales: dict[str, float] | None, name: str) -> float:
    if scales is None or name not in scales:
        raise ValueError(f"part {name} holds int8 codes: pass the model's scales (model.entry.user_scales)")
    return scales[name]


def entry_arrays(cache: ZooCache, cfg: ModelConfig, scales: dict[str, float] | None = None
                 ) -> dict[str, torch.Tensor]:
    """A padded batch of entries, part by part: name → (B, R, width) (see the module docstring). ``scales``
    (:func:`user_scales`) turn the cache's int8-valued user parts into their codes (q8 parts)."""
    fields = key_fields(cfg)
    out: dict[str, torch.Tensor] = {}
    for p in entry_parts(cfg):
        group, attr = p.name.split(".", 1)
        if p.kind == "key":
            m, bits = fields[attr]
            out[p.name] = pack_keys(cache.keys[attr], m, bits)  # (B, R, width)
            continue
        t = getattr(cache.kv[group], "k_idx" if attr == "kv_idx" else attr)
        if p.kind == "q8":
            t = int8_codes(t, _scale(scales, p.name))  # exact: the cache holds code · scale in fp32
        out[p.name] = t.unsqueeze(-1) if p.kind == "idx" else t  # (B, R, width)
    return out


def cache_from_arrays(arrays: dict[str, torch.Tensor], lengths: torch.Tensor, cfg: ModelConfig,
                      scales: dict[str, float] | None = None) -> ZooCache:
    """Inverse of :func:`entry_arrays`: the :class:`ZooCache` a model decodes from (hard routing).

    arrays: name → (B, R_p, width) for every part of :func:`entry_parts` (padding rows hold zeros;
    R_p may be any width >= the batch's longest ``min(n, cap)``); lengths: (B,) behaviours per user
    (``min(n, window_len)``). Index parts become int64 (a joint ``kv_idx`` is both ``k_idx`` and ``v_idx``),
    keys are unpacked, q8 codes become fp32 ``code · scale`` (``scales``: :func:`user_scales`).
    """
    missing = [p.name for p in entry_parts(cfg) if p.name not in arrays]
    if missing:
        raise ValueError(f"entry arrays lack parts {missing}")
    fields = key_fields(cfg)
    keys = {}
    for name, (m, bits) in fields.items():
        keys[name] = unpack_keys(arrays[f"keys.{name}"], m, bits)
    kv: dict[str, KVCache] = {}
    for g in group_specs(cfg):
        group, cap = g.name, g.cap

        def get(attr: str, is_idx: bool, group: str = group) -> torch.Tensor | None:
            t = arrays.get(f"{group}.{attr}")
            if t is None or not is_idx:
                return t
            return t.squeeze(-1).to(torch.int64)  # (B, R)

        def user(side: str, g: GroupSpec = g) -> torch.Tensor | None:
            name = f"{g.name}.{side}_user"
            t = arrays.get(name)
            return dequantise(t, _scale(scales, name)) if t is not None and g.user_kind(side) == "q8" else t

        k_idx = get("kv_idx", True) if g.joint else get("k_idx", True)
        v_idx = k_idx if g.joint else get("v_idx", True)
        v_user = user("v")
        if v_user is None:  # a V of pool rows alone: zero-width user part (model.longseq.SDIM keyed by its index)
            assert v_idx is not None
            v_user = torch.zeros(*v_idx.shape, 0, device=v_idx.device)
        k_user = user("k")
        if k_user is None:  # a V-only group: zero-width K (model.blocks.TABlock)
            k_user = v_user[..., :0]
        kv[group] = KVCache(k_user=k_user, v_user=v_user, k_idx=k_idx, v_idx=v_idx,
                            lengths=lengths.clamp(max=cap))  # fmt: skip
    return ZooCache(lengths=lengths, kv=kv, keys=keys)


def full_cache(model: torch.nn.Module, cache: ZooCache) -> ZooCache:
    """The full-KV form of a cache: every group's K/V rebuilt at d_a (user part ⊕ pool rows), no
    indices — what the full-KV baseline store holds. ``model.decode`` reads it like the original (SIM / ETA keyed by
    their pool rows: the rows' keys become cached keys, since no index is left to look them up with)."""
    kv = {}
    for group, (k, v) in model.keys_values(cache).items():  # (B, R, d_a) each (K zero-width if V-only)
        kv[group] = KVCache(k_user=k, v_user=v, k_idx=None, v_idx=None, lengths=cache.kv[group].lengths)
    keys = {model.key_name: model.behaviour_codes(cache)} if model.cfg.pool_keys else cache.keys
    return ZooCache(lengths=cache.lengths, kv=kv, keys=keys)
