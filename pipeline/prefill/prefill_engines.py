"""Prefill engines: how a chunk of padded histories becomes cache entries (no Spark, no Arrow).

All engines return the model's own values; :mod:`pipeline.prefill.prefill` turns them into output rows. The din
engines (``direct``, ``memo``) return a :class:`FlatKV` (flat over valid behaviours, at the layout's storage
dtypes; :func:`flat_entries` makes payloads), the zoo and ``noop`` engines a :class:`FlatEntries` (each user's
record payload — its :class:`EntryLayout` parts — back to back).
Engines (when each is used: :mod:`pipeline.prefill.prefill`): ``direct`` (``model.prefill`` per chunk, the
reference), ``memo`` (one ``model.prefill`` per token of the item vocabulary, in fixed blocks, cached; din only,
not with per-event features: :mod:`model.events`), ``zoo`` (:class:`ZooEngine`, ``model.prefill`` per chunk
for the zoo archs), ``noop`` (no model: the I/O floor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from collectivekv.cachestore.decode.entry_batch import kv_storage
from collectivekv.cachestore.store.entry import EntryLayout, entry_layout
from collectivekv.cachestore.store.record import HEADER_SIZE, IDX_DTYPES
from collectivekv.model.cache import KVCache
from collectivekv.model.cache_spec import GroupSpec
from collectivekv.model.config import ModelConfig
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.entry import user_scales
from collectivekv.model.quant import int8_codes
from collectivekv.pipeline.prefill.zoo_engine import MAX_POSITIONS as _DIRECT_POSITIONS
from collectivekv.pipeline.prefill.zoo_engine import (  # noqa: F401  (FlatEntries, ZooEngine, _empty_entries: re-exported)
    FlatEntries,
    ZooEngine,
    _empty_entries,
    checked_device,
)

ENGINES = ("auto", "memo", "direct", "noop")
DEFAULT_MEMO_BYTES = 256 << 20
# (tokens x pool) router logits per model.prefill call of the memo engine: on a CPU, logits that stay
# in cache (2^21 cells = 8 MB) run the router 2.2x faster than 2^24 (measured: 50k tokens, pool 10k)
_ROUTER_CELLS = {"cpu": 1 << 21, "cuda": 1 << 24}


def check_engine(layout: EntryLayout, kind: str) -> None:
    """Refuse an engine that cannot write ``layout`` (checked on the driver before any task)."""
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {kind!r}")
    if layout.arch != "din" and kind == "memo":
        raise ValueError(f"engine 'memo' needs the din arch (a token-wise single K/V group); arch "
                         f"{layout.arch!r} caches several groups: use --engine auto or direct (the zoo engine)")


def cache_layout(cfg: ModelConfig, model_version: str, mode: str = "collective",
                 kv_dtype: str = "float16") -> EntryLayout:
    """The layout a prefill of this model writes in ``mode`` ("collective" or "full"): its
    :class:`cachestore.store.entry.EntryLayout` (:func:`cachestore.store.entry.entry_layout`), for every arch."""
    return entry_layout(cfg, model_version, mode, kv_dtype)


def din_group(layout: EntryLayout) -> GroupSpec:
    """The one K/V group of a din layout (widths, shared sides); ValueError for another layout."""
    if layout.arch != "din" or layout.flat_group is None:
        raise ValueError(f"the din engines write din layouts; got arch {layout.arch!r}")
    return layout.flat_group


@dataclass(frozen=True)
class FlatKV:
    """One chunk's cache entries, flat over the valid behaviours in user order, as stored.

    k, v: (N, dk), (N, dv) numpy arrays of the layout's kv storage dtype (bfloat16 as uint16 bits), or int8
    codes for a q8 user part; k_idx, v_idx: (N,) of the index dtype, or None when that side is not shared (a joint
    index is k_idx, with v_idx None: the layout's one ``kv.kv_idx`` part).
    """

    k: np.ndarray
    v: np.ndarray
    k_idx: np.ndarray | None
    v_idx: np.ndarray | None


def flat_entries(kv: FlatKV, lengths: np.ndarray) -> FlatEntries:
    """The record payloads of a chunk's din entries: user b's payload is its ``n_b`` rows of k, then of v,
    k_idx, v_idx (the parts present), back to back (the din :class:`EntryLayout`'s parts, cap max_len)."""
    n = lengths.astype(np.int64)
    parts = [np.ascontiguousarray(a) for a in (kv.k, kv.v, kv.k_idx, kv.v_idx) if a is not None]
    rows = [a.reshape(len(a), -1).view(np.uint8) for a in parts]  # (N, bytes per behaviour) each
    widths = [r.shape[1] for r in rows]
    offsets = np.zeros(len(n) + 1, np.int64)
    np.cumsum(n * sum(widths), out=offsets[1:])
    out = np.empty(int(offsets[-1]), np.uint8)
    if not len(out):
        return FlatEntries(out, offsets)
    user = np.repeat(np.arange(len(n)), n)  # (N,) owner of each behaviour
    first = np.cumsum(n) - n  # (B,) its first behaviour
    row = np.arange(int(n.sum())) - first[user]  # (N,) position within its user
    before = 0
    for raw, w in zip(rows, widths, strict=True):
        dst = offsets[user] + n[user] * before + row * w  # (N,) start byte of each row
        as_strided(out, (len(out) - w + 1, w), (1, 1))[dst] = raw  # row i = out[i : i + w] (a view)
        before += w
    return FlatEntries(out, offsets)


def _index_storage(idx: torch.Tensor, idx_dtype: str) -> np.ndarray:
    return idx.to(torch.int32).cpu().numpy().astype(IDX_DTYPES[idx_dtype][1])


class _ModelEngine:
    def __init__(self, model: TargetAttentionCTR, layout: EntryLayout) -> None:
        cfg = model.cfg
        self.group = din_group(layout)
        self.device = checked_device(model, layout, cache_layout(cfg, layout.model_version, layout.mode,
                                                                 layout.kv_dtype))
        self.model = model
        self.layout = layout
        self.scales = user_scales(model, cfg)  # int8 user parts: the codes' scales (empty for float parts)

    def _user(self, t: torch.Tensor, side: str) -> np.ndarray:
        """(N, d) user values of ``side`` → storage: kv dtype, or int8 codes for a q8 part."""
        if self.group.user_kind(side) == "q8":
            return int8_codes(t, self.scales[f"kv.{side}_user"]).cpu().numpy()
        return kv_storage(t, self.layout.kv_dtype)

    def _entries(self, cache: KVCache, valid: torch.Tensor) -> FlatKV:
        """Encode the valid positions of a padded cache (B, L, .) as flat storage arrays."""
        lay, g = self.layout, self.group
        if lay.mode == "full":
            k, v = self.model.keys_values(cache)  # (B, L, d_a) each
            return FlatKV(kv_storage(k[valid], lay.kv_dtype), kv_storage(v[valid], lay.kv_dtype), None, None)
        ki = _index_storage(cache.k_idx[valid], lay.idx_dtype) if g.k_shared else None
        vi = _index_storage(cache.v_idx[valid], lay.idx_dtype) if g.v_shared and not g.joint else None
        return FlatKV(self._user(cache.k_user[valid], "k"), self._user(cache.v_user[valid], "v"), ki, vi)

    def _prefill(self, items: np.ndarray, feedback: np.ndarray, lengths: np.ndarray) -> FlatKV:
        dev = self.device
        with torch.inference_mode():
            it = torch.from_numpy(items).to(dev)
            fb = torch.from_numpy(feedback).to(dev)
            ln = torch.from_numpy(lengths).to(dev)
            cache = self.model.prefill(it, fb, ln)
            valid = torch.arange(items.shape[1], device=dev)[None, :] < ln[:, None]
            return self._entries(cache, valid)


def _concat(parts: list[FlatKV]) -> FlatKV:
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> np.ndarray | None:
        arrs = [getattr(p, name) for p in parts]
        return None if arrs[0] is None else np.concatenate(arrs)

    return FlatKV(cat("k"), cat("v"), cat("k_idx"), cat("v_idx"))


class DirectEngine(_ModelEngine):
    """``model.prefill`` on the padded window, in sub-chunks of at most 65,536 padded positions."""

    name = "direct"

    def run(self, items: np.ndarray, feedback: np.ndarray, lengths: np.ndarray) -> FlatKV:
        parts, lo, b = [], 0, len(lengths)
        while lo < b:
            hi, longest = lo, 0
            while hi < b and max(longest, int(lengths[hi]), 1) * (hi + 1 - lo) <= _DIRECT_POSITIONS:
                longest = max(longest, int(lengths[hi]))
                hi += 1
            hi = max(hi, lo + 1)
            width = max(1, int(lengths[lo:hi].max()))
            parts.append(self._prefill(items[lo:hi, :width], feedback[lo:hi, :width], lengths[lo:hi]))
            lo = hi
        return _concat(parts) if parts else _empty(self.layout)


class MemoEngine(_ModelEngine):
    """Per-worker table of each token's encoded cache entry (see module docstring).

    The table is filled in fixed *blocks* of the item vocabulary: block b holds items
    [b * I, (b + 1) * I) x feedback {1, 2}, always computed by one ``model.prefill`` call of the same
    2·I one-behaviour histories. A token's entry therefore never depends on which users, chunks,
    partitions or workers asked for it (matmul results do depend on the batch shape), so re-runs
    write byte-identical records whatever the partitioning, and a reset (table full) recomputes the
    same bits. I = (2^21 router cells on a CPU, 2^24 on a GPU) / pool_size / 2. With ``block_dir``
    the blocks are shared with the other processes of the machine (pipeline/prefill/block_cache.py), so a
    Spark executor computes each block once, not once per Python worker.
    """

    name = "memo"

    def __init__(self, model: TargetAttentionCTR, layout: EntryLayout, memo_bytes: int = DEFAULT_MEMO_BYTES,
                 block_dir: str | os.PathLike | None = None) -> None:
        super().__init__(model, layout)
        self.n_items = model.cfg.n_items
        self.nf = model.cfg.n_feedback  # feedback ids 1 .. nf-1 (label and event code, model/events.py)
        vocab = (self.n_items + 1) * self.nf
        if vocab > 1 << 27:
            raise ValueError(f"memo engine: token vocabulary {vocab} too large for a dense slot table")
        idx = IDX_DTYPES[layout.idx_dtype][1] if layout.idx_dtype else None
        g = self.group
        empty = _empty(layout)
        per_entry = empty.k.itemsize * g.dk + empty.v.itemsize * g.dv + (idx.itemsize if idx else 0) * 2
        pool = model.cfg.collective.pool_size if g.k_shared or g.v_shared else 1
        cells = _ROUTER_CELLS.get(self.device.type, _ROUTER_CELLS["cpu"])
        self.block_items = max(1, min(1 << 15, cells // pool // 2))
        self.capacity = max(4 * self.block_items, memo_bytes // per_entry)  # entries
        self._slot = np.full(vocab, -1, dtype=np.int32)  # token -> row of the tables, -1 unknown
        self._k, self._v, self._ki, self._vi = empty.k, empty.v, empty.k_idx, empty.v_idx
        self.size = 0
        self.resets = 0
        self.shared = None
        if block_dir is not None:  # blocks shared with the other processes of this machine
            from collectivekv.pipeline.prefill.block_cache import SharedBlocks

            key = f"{layout.model_version}-{layout.mode}-{layout.kv_dtype}-{self.device.type}-{self.block_items}"
            self.shared = SharedBlocks(Path(block_dir) / key)

    def _grow(self, need: int) -> None:
        cap = len(self._k)
        if need <= cap:
            return
        new = min(self.capacity, max(need, 2 * cap, 1 << 12))

        def grow(a: np.ndarray) -> np.ndarray:
            out = np.empty((new, *a.shape[1:]), a.dtype)
            out[: self.size] = a[: self.size]
            return out

        self._k, self._v = grow(self._k), grow(self._v)
        self._ki = grow(self._ki) if self._ki is not None else None
        self._vi = grow(self._vi) if self._vi is not None else None

    def _block(self, b: int) -> tuple[np.ndarray, FlatKV]:
        """(tokens, entries) of block b: items [b·I, (b+1)·I) ∩ [0, n_items], every feedback id 1 .. nf-1."""
        items = np.arange(b * self.block_items, min((b + 1) * self.block_items, self.n_items + 1), dtype=np.int64)
        it = np.repeat(items, self.nf - 1)
        fb = np.tile(np.arange(1, self.nf, dtype=np.int64), len(items))
        return it * self.nf + fb, self._prefill(it[:, None], fb[:, None], np.ones(len(it), np.int64))

    def _block_arrays(self, b: int) -> dict[str, np.ndarray]:
        tok, out = self._block(b)
        arrays = {"tok": tok, "k": out.k, "v": out.v}
        if out.k_idx is not None:
            arrays["ki"] = out.k_idx
        if out.v_idx is not None:
            arrays["vi"] = out.v_idx
        return arrays

    def _block_of(self, tokens: np.ndarray) -> np.ndarray:
        return tokens // self.nf // self.block_items

    def _add(self, blocks: np.ndarray) -> None:
        self._grow(self.size + (self.nf - 1) * self.block_items * len(blocks))
        if self.shared is not None:
            source = self.shared.fetch(blocks.tolist(), self._block_arrays)
        else:
            source = ((b, self._block_arrays(b)) for b in blocks.tolist())
        for _, arr in source:
            tok = arr["tok"]
            s, n = self.size, len(tok)
            self._k[s : s + n], self._v[s : s + n] = arr["k"], arr["v"]
            if self._ki is not None:
                self._ki[s : s + n] = arr["ki"]
            if self._vi is not None:
                self._vi[s : s + n] = arr["vi"]
            self._slot[tok] = np.arange(s, s + n, dtype=np.int32)
            self.size += n

    def _reset(self) -> None:
        self._slot.fill(-1)
        self.size = 0
        self.resets += 1

    def _stream(self, tokens: np.ndarray) -> FlatKV:
        """Entries for a chunk whose blocks exceed the table: block by block, nothing kept."""
        blk = self._block_of(tokens)
        order = np.argsort(blk, kind="stable")
        bounds = np.flatnonzero(np.diff(blk[order])) + 1
        parts: list[tuple[np.ndarray, FlatKV]] = []
        for seg in np.split(order, bounds):
            tok, out = self._block(int(blk[seg[0]]))
            local = np.searchsorted(tok, tokens[seg])
            parts.append((seg, FlatKV(out.k[local], out.v[local], None if out.k_idx is None else out.k_idx[local],
                                      None if out.v_idx is None else out.v_idx[local])))
        res = _concat([p for _, p in parts])
        inv = np.empty_like(order)
        inv[np.concatenate([seg for seg, _ in parts])] = np.arange(len(order))
        return FlatKV(res.k[inv], res.v[inv], None if res.k_idx is None else res.k_idx[inv],
                      None if res.v_idx is None else res.v_idx[inv])

    def run(self, items: np.ndarray, feedback: np.ndarray, lengths: np.ndarray) -> FlatKV:
        valid = np.arange(items.shape[1])[None, :] < lengths[:, None]
        tokens = items[valid] * self.nf + feedback[valid]  # (N,) in user order
        if not len(tokens):
            return _empty(self.layout)
        slots = self._slot[tokens]
        missing = slots < 0
        if missing.any():
            blocks = np.unique(self._block_of(tokens[missing]))
            if self.size + (self.nf - 1) * self.block_items * len(blocks) > self.capacity:
                self._reset()
                blocks = np.unique(self._block_of(tokens))
                if (self.nf - 1) * self.block_items * len(blocks) > self.capacity:
                    return self._stream(tokens)
            self._add(blocks)
            slots = self._slot[tokens]
        return FlatKV(self._k[slots], self._v[slots],
                      self._ki[slots] if self._ki is not None else None,
                      self._vi[slots] if self._vi is not None else None)


class NoopEngine:
    """Entries of the right sizes without a model: the job's I/O floor (benchmarks/prefill.py).

    Each user's payload is a slice of one fixed pseudo-random block (so Parquet writes as many bytes
    as for a real run; zeros would compress away), of the record's payload size; deterministic (router
    indices may exceed the pool)."""

    name = "noop"
    _BLOCK = np.random.default_rng(0).integers(0, 256, 1 << 22, dtype=np.uint8)

    def __init__(self, layout: EntryLayout) -> None:
        self.layout = layout
        self._pos = 0

    def _fill(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > len(self._BLOCK):
            return np.resize(self._BLOCK, nbytes).view(dtype).reshape(shape)
        lo = self._pos if self._pos + nbytes <= len(self._BLOCK) else 0
        self._pos = (lo + 4099) % len(self._BLOCK)
        return self._BLOCK[lo : lo + nbytes].copy().view(dtype).reshape(shape)

    def run(self, items: np.ndarray, feedback: np.ndarray, lengths: np.ndarray) -> FlatEntries:
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(self.layout.record_sizes(lengths) - HEADER_SIZE, out=offsets[1:])
        return FlatEntries(self._fill((int(offsets[-1]),), np.dtype(np.uint8)), offsets)


def _empty(layout: EntryLayout) -> FlatKV:
    g = din_group(layout)
    kv = {side: layout.dtype(g.user_kind(side)) for side in "kv"}
    idx = IDX_DTYPES[layout.idx_dtype][1] if layout.idx_dtype else None
    return FlatKV(np.zeros((0, g.dk), kv["k"]), np.zeros((0, g.dv), kv["v"]),
                  np.zeros(0, idx) if g.k_shared else None, np.zeros(0, idx) if g.v_shared and not g.joint else None)


def tokenwise(model: TargetAttentionCTR, layout: EntryLayout, seed: int = 0) -> bool:
    """Whether the model's cache entries depend on the behaviour token alone (memo engine valid):
    a random padded batch through ``model.prefill`` vs the same tokens one at a time."""
    rng = np.random.default_rng(seed)
    b, seq = 4, min(model.cfg.max_len, 16)
    lengths = np.array([seq, seq // 2, 1, 0], dtype=np.int64)[:b]
    items = rng.integers(1, model.cfg.n_items + 1, (b, seq)).astype(np.int64)
    items[:, : seq // 2] = items[0, -1]  # repeated tokens at several positions
    feedback = rng.integers(1, model.cfg.n_feedback, (b, seq)).astype(np.int64)
    valid = np.arange(seq)[None, :] < lengths[:, None]
    items, feedback = np.where(valid, items, 0), np.where(valid, feedback, 0)
    ref = DirectEngine(model, layout).run(items, feedback, lengths)
    one = DirectEngine(model, layout).run(items[valid][:, None], feedback[valid][:, None],
                                          np.ones(int(valid.sum()), np.int64))
    for a, c in zip((ref.k, ref.v), (one.k, one.v), strict=True):
        fa, fc = _as_float(a, layout.kv_dtype), _as_float(c, layout.kv_dtype)
        if not np.allclose(fa, fc, rtol=4 * _eps(layout.kv_dtype), atol=1e-6):
            return False
    return all(a is None or np.array_equal(a, c)
               for a, c in ((ref.k_idx, one.k_idx), (ref.v_idx, one.v_idx)))


def _eps(kv_dtype: str) -> float:
    return {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-20}[kv_dtype]


def _as_float(a: np.ndarray, kv_dtype: str) -> np.ndarray:
    if kv_dtype == "bfloat16":
        return torch.from_numpy(a.copy()).view(torch.bfloat16).float().numpy()
    return a.astype(np.float32)


def make_engine(model: torch.nn.Module | None, layout: EntryLayout, kind: str = "auto",
                memo_bytes: int = DEFAULT_MEMO_BYTES, block_dir: str | os.PathLike | None = None
                ) -> DirectEngine | MemoEngine | ZooEngine | NoopEngine:
    """An engine of ``kind`` (see module docstring); ``auto`` = memo if :func:`tokenwise`, else direct;
    for the zoo archs ``auto`` / ``direct`` = :class:`ZooEngine`, ``memo`` is refused."""
    check_engine(layout, kind)
    if kind == "noop":
        return NoopEngine(layout)
    if model is None:
        raise ValueError(f"engine {kind!r} needs a model")
    if layout.arch != "din":
        return ZooEngine(model, layout)
    if kind == "direct":
        return DirectEngine(model, layout)
    if kind == "auto" and (model.cfg.event_features or (model.cfg.n_items + 1) * model.cfg.n_feedback > 1 << 27
                           or not tokenwise(model, layout)):
        return DirectEngine(model, layout)
    return MemoEngine(model, layout, memo_bytes, block_dir)
