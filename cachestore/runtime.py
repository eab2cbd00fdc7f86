"""Decode runtime: score requests (user ids + candidate items) against the published cache store.

One :class:`DecodeRuntime` per serving process (create it after fork). It keeps the checkpoint's
scoring model and global K/V pools resident on the device (CUDA when available, else CPU) and
scores a batch in five steps, each measured:

    fetch      StoreReader → reusable (pinned) host buffer, jagged records    cachestore/batch.py
    transfer   one host→device copy, timed with CUDA events                   cachestore/transfer.py
    unpack     jagged records → padded KVCache on the device                  cachestore/transfer.py
    decode     pool lookup / gather + target attention + MLP → logits         cachestore/decode.py
    result     logits back to the host (numpy)

Users absent from the store are scored as cold start (empty history: attention output 0, exactly
``model.decode`` with length 0) and counted; a store built by another model version is refused when
the runtime is created, a record written by another model version when it is fetched (both
``ModelVersionMismatchError``). The store may be the full-KV baseline store (layout mode "full").

Two store formats: record format v1 (``CacheLayout``) holds the ``din`` arch's one K/V group and is
decoded by :func:`cachestore.decode.decode` (poolscore or gather); record format v2 (``EntryLayout``,
:mod:`cachestore.entry`) holds a zoo model's cache — several K/V groups plus retrieval keys (SIM, ETA,
SDIM, TWIN, HSTU; also din) — unpacked part by part (:func:`cachestore.transfer.unpack_entry`),
rebuilt with ``model.entry.cache_from_arrays`` and decoded by the model's own ``decode``
(:func:`cachestore.decode.decode_zoo`). The store's arch and parts must be exactly those
``cachestore.entry.entry_layout`` gives for the checkpoint (:func:`check_layout`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cachestore.batch import HostBatcher, is_entry_layout
from cachestore.decode import PATHS, ResidentModel, ResidentZooModel, decode, decode_zoo, entry_cache
from cachestore.entry import entry_layout
from cachestore.fused import DEFAULT_FUSED, FUSED, FusedConfig, fused_available, fused_decode, uses_fused
from cachestore.graphs import GraphedDecoder
from cachestore.mapped import MappedBatcher
from cachestore.record import LayoutError, ModelVersionMismatchError, RouterIndexError
from cachestore.store_check import check_tree
from cachestore.transfer import to_device
from model.ctr import TargetAttentionCTR
from model.entry import store_config

if TYPE_CHECKING:
    from cachestore.batch import StoreLayout
    from cachestore.entry import EntryLayout
    from cachestore.reader import StoreReader


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_version(layout: StoreLayout, model_version: str) -> None:
    if layout.model_version != model_version:
        raise ModelVersionMismatchError(
            f"the store was built by model version {layout.model_version}, but the loaded checkpoint is "
            f"model version {model_version}: load the checkpoint the store was prefilled with, or prefill "
            "and publish a store for this checkpoint")


def check_entry_layout(layout: EntryLayout, model: torch.nn.Module, model_version: str) -> None:
    """Refuse a v2 (zoo) store that was not prefilled with this model: other arch, other model
    version, or parts (names, kinds, widths, caps), index dtype, pool size or window that are not
    ``entry_layout(model.cfg, version, layout.mode, layout.kv_dtype)``'s."""
    cfg = model.cfg
    arch = getattr(cfg, "arch", "din")
    if layout.arch != arch:
        raise LayoutError(f"the store holds {layout.arch!r} caches (record format v2), but the checkpoint is arch "
                          f"{arch!r} ({type(model).__name__}): load the checkpoint the store was prefilled with")
    _check_version(layout, model_version)
    if layout.mode == "collective" and cfg.kv_mode != "collective":
        raise LayoutError("the store holds collective caches (user parts + router indices), but the checkpoint is "
                          "a full-KV model: load the collective checkpoint the store was prefilled with")
    want = entry_layout(cfg, model_version, layout.mode, layout.kv_dtype)
    if want.parts != layout.parts:
        have = {p.name: p for p in layout.parts}
        need = {p.name: p for p in want.parts}
        diffs = [f"missing {sorted(set(need) - set(have))}"] if set(need) - set(have) else []
        diffs += [f"unexpected {sorted(set(have) - set(need))}"] if set(have) - set(need) else []
        diffs += [f"{n}: store (kind, width, cap) = {(have[n].kind, have[n].width, have[n].cap)}, model needs "
                  f"{(need[n].kind, need[n].width, need[n].cap)}" for n in need if n in have and have[n] != need[n]]
        if not diffs:
            diffs = ["same parts in another order"]
        raise LayoutError(f"the store's parts do not fit the {arch} model for a {layout.mode} store: "
                          f"{'; '.join(diffs)}")
    for name in ("idx_dtype", "pool_size", "max_len"):
        got, exp = getattr(layout, name), getattr(want, name)
        if got != exp:
            raise LayoutError(f"store {name} {got!r} != {exp!r} expected for this {arch} model")


def check_layout(layout: StoreLayout, model: torch.nn.Module, model_version: str) -> None:
    """Refuse a store that was not prefilled with this model (version) or whose shapes differ.

    A v1 store (``CacheLayout``) holds din caches: only a ``din`` checkpoint (TargetAttentionCTR)
    serves it. A v2 store (``EntryLayout``): :func:`check_entry_layout`."""
    if is_entry_layout(layout):
        check_entry_layout(layout, model, model_version)  # type: ignore[arg-type]
        return
    arch = getattr(model.cfg, "arch", "din")
    if type(model) is not TargetAttentionCTR or arch != "din":
        raise LayoutError("this store (record format v1) holds din caches: it serves the din arch "
                          f"(TargetAttentionCTR) only; the checkpoint is arch {arch!r} ({type(model).__name__}), "
                          "whose cache has several K/V groups: serve it from a zoo store (record format v2) "
                          "prefilled with this checkpoint")
    _check_version(layout, model_version)
    cfg = model.cfg
    if layout.mode == "full":
        want = (cfg.d_attn, cfg.d_attn, False, False)
    else:
        want = (cfg.dk_user, cfg.dv_user, cfg.k_shared, cfg.v_shared)
        if (cfg.k_shared or cfg.v_shared) and layout.pool_size != cfg.collective.pool_size:
            raise LayoutError(f"store pool_size {layout.pool_size} != model pool_size {cfg.collective.pool_size}")
    got = (layout.dk, layout.dv, layout.k_shared, layout.v_shared)
    if got != want:
        raise LayoutError(f"store layout (dk, dv, k_shared, v_shared) = {got} does not fit the model: {want} "
                          f"expected for a {layout.mode} store")


@dataclass
class RuntimeStats:
    """Totals over every batch a runtime scored (milliseconds are sums over batches)."""

    batches: int = 0
    users: int = 0
    cold_start_users: int = 0
    candidates: int = 0
    h2d_bytes: int = 0
    fetch_ms: float = 0.0
    h2d_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoreResult:
    """logits (B, C) float32 numpy (NaN where ``candidates`` was padding), cold_start (B,) bool."""

    logits: np.ndarray
    cold_start: np.ndarray
    stats: RuntimeStats = field(default_factory=RuntimeStats)

    @property
    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))


class DecodeRuntime:
    """Scores batches of requests; see the module docstring.

    model / model_version: the checkpoint (``pipeline.checkpoint.load_checkpoint``; any arch whose
    store format the reader's layout is, see the module docstring); the model is moved to ``device``.
    reader: a :class:`cachestore.reader.StoreReader` of the store version to serve. path: "auto" |
    "fused" | "poolscore" | "gather" (:mod:`cachestore.decode`; "auto" on CUDA with Triton and a v1 din
    store is "fused", :mod:`cachestore.fused`; a zoo model always decodes with its own
    attention: "auto" and "gather" are accepted, "poolscore" is refused). batch_users: users per
    fetch/transfer/decode step. max_pairs: at most this many (user, candidate) pairs per step (rows
    are grouped by candidate count; each step is trimmed to its widest row). pad_to: pad every batch
    to this history length (static shapes for CUDA graphs / torch.compile; default: the longest
    history in the batch). verify_crc: walk the store's B-tree once at construction
(:func:`cachestore.store_check.check_tree`) and CRC-check every fetched record (off: headers, sizes and
router index bounds only).
    graphs: decode each step by replaying a CUDA graph (:mod:`cachestore.graphs`; CUDA and v1 (din)
    stores only): steps are padded with cold-start slots to a fixed size per candidate width C
    (``min(batch_users, max_pairs // C)``) and to L = pad_to (default: the store's max_len); one
    :class:`GraphedDecoder` per (step size, C), which captures a graph (copies included) per host
    buffer and copy-size bucket on first use. fused_config: the fused
    kernel's launch settings where it runs (:class:`cachestore.fused.FusedConfig`; by default it reads the pool
    rows at the store's kv dtype, ``FusedConfig(pool_dtype="float32")`` reads the model's rows exactly).
    zero_copy (with graphs): fetch with :class:`cachestore.mapped.MappedBatcher` — the CPU looks the users
    up and writes a gather table, the graph gathers the records from the store's LMDB map (registered with
    CUDA: the store file's pages stay pinned in host memory while the runtime serves). On an H100 host at
    L 1,000, B 512 it took a request from 2.09 to 1.47 ms (fetch 1.34 → 0.79 ms, replay 0.18 → 0.21 ms;
    ``benchmarks/results/zero_copy.json``); at L 50 it gains nothing (small records are cheap to copy).
    """

    def __init__(self, model: torch.nn.Module, model_version: str, reader: StoreReader, *,
                 device: torch.device | str | None = None, path: str = "auto", batch_users: int = 512,
                 n_buffers: int = 2, verify_crc: bool = False, pad_to: int | None = None,
                 pin: bool | None = None, max_pairs: int = 8192, graphs: bool = False,
                 fused_config: FusedConfig = DEFAULT_FUSED, zero_copy: bool = False) -> None:
        if path not in (*PATHS, FUSED):
            raise ValueError(f"path must be one of {(*PATHS, FUSED)}, got {path!r}")
        if batch_users < 1:
            raise ValueError("batch_users must be >= 1")
        layout = reader.layout
        check_layout(layout, model, model_version)
        if verify_crc:  # the full check: every B-tree page, so that no read can leave the file
            check_tree(reader.version_dir)
        self.device = torch.device(device) if device is not None else default_device()
        self.entry = is_entry_layout(layout)  # v2 store: unpack part by part, cache_from_arrays
        if graphs and (self.device.type != "cuda" or self.entry):
            raise ValueError("graphs=True needs a CUDA device and a record format v1 (din) store; "
                             f"got device {self.device}, record format {2 if self.entry else 1}")
        if zero_copy and not graphs:
            raise ValueError("zero_copy=True needs graphs=True (the graph gathers the records from the store's map)")
        self.graphs = graphs
        self._graphs: dict[tuple[int, int], GraphedDecoder] = {}  # (step users, candidates) -> graph
        self.zoo = getattr(model.cfg, "arch", "din") != "din"
        if self.zoo and path == "poolscore":
            raise ValueError(f"path 'poolscore' is the din model's attention; a {model.cfg.arch} model decodes with "
                             "its own attention (use path 'auto' or 'gather')")
        self.resident: ResidentModel | ResidentZooModel = (
            ResidentZooModel(model, self.device) if self.zoo else ResidentModel(model, self.device))
        self._store_cfg = store_config(model.cfg, layout.mode) if self.entry else None
        self.model_version = model_version
        self.reader = reader
        self.layout = layout
        self.path = path
        din_v1 = not self.entry and not self.zoo  # what the fused kernel reads
        if path == FUSED and not (din_v1 and fused_available(self.device)):
            raise ValueError(f"path 'fused' needs a record format v1 (din) store and Triton on a CUDA device "
                             f"(device {self.device})")
        self.fused = din_v1 and uses_fused(path, self.device)  # "auto" on CUDA with Triton, or "fused"
        self.fused_config = fused_config
        self.batch_users = batch_users
        self.pad_to = pad_to
        self.graph_len = pad_to or max(1, layout.max_len)  # L of the graphs
        self.max_pairs = max_pairs
        pin = (self.device.type == "cuda") if pin is None else pin
        kind = MappedBatcher if zero_copy else HostBatcher
        self.batcher: HostBatcher | MappedBatcher = kind(
            layout, reader=reader, expected_model_version=model_version, pin=pin, n_buffers=n_buffers,
            batch_users=batch_users, verify_crc=verify_crc)
        self.stats = RuntimeStats()

    @classmethod
    def open(cls, store: str | os.PathLike, checkpoint: str | os.PathLike | None = None, **kwargs) -> DecodeRuntime:
        """A runtime for a store (a store root: its ``current`` version; or a version directory)
        and a checkpoint directory (None: the ``checkpoint/`` published inside the same store version
        by ``ckv refresh``, so records and model always come from one version)."""
        from cachestore.publish import CURRENT, open_current
        from cachestore.reader import StoreReader
        from pipeline.checkpoint import load_checkpoint

        store = Path(store)
        version_dir = open_current(store) if os.path.lexists(store / CURRENT) else store
        if checkpoint is None:
            checkpoint = version_dir / "checkpoint"
            if not checkpoint.is_dir():
                raise FileNotFoundError(f"{version_dir} has no checkpoint/ (published by ckv refresh): pass one")
        ckpt = load_checkpoint(checkpoint, device="cpu")
        return cls(ckpt.model, ckpt.model_version, StoreReader(version_dir), **kwargs)

    def _check_targets(self, targets: np.ndarray) -> None:
        n_items = self.resident.cfg.n_items
        if targets.size and (int(targets.min()) < 0 or int(targets.max()) > n_items):
            bad = targets[(targets < 0) | (targets > n_items)][0]
            raise ValueError(f"candidate item {int(bad)} outside the model's items 0..{n_items} (0 = padding)")

    def score(self, user_ids: np.ndarray | list[int], candidates: np.ndarray | list, n_candidates=None) -> ScoreResult:
        """Score candidates (B, C) (or (B,): one each) of users (B,). ``n_candidates`` (B,): how many
        leading entries of each row are real (default all); padded entries get logit NaN."""
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        cand = np.asarray(candidates, dtype=np.int64)
        cand = cand.reshape(-1, 1) if cand.ndim == 1 else cand
        if cand.shape[0] != len(ids):
            raise ValueError(f"{cand.shape[0]} candidate rows for {len(ids)} users")
        real = np.ones(cand.shape, dtype=bool)
        if n_candidates is not None:
            real = np.arange(cand.shape[1])[None, :] < np.asarray(n_candidates, dtype=np.int64)[:, None]
        cand = np.where(real, cand, 0)
        self._check_targets(cand)
        logits = np.full(cand.shape, np.nan, dtype=np.float32)
        cold = np.zeros(len(ids), dtype=bool)
        stats = RuntimeStats()
        counts = real.sum(1)
        # rows with similar candidate counts share a step; each step is trimmed to its widest row and
        # holds at most max_pairs (user, candidate) pairs (attention scores grow with B·C·H·L)
        order = np.argsort(-counts, kind="stable")
        lo = 0
        while lo < len(ids):
            width = max(1, int(counts[order[lo]]))
            step = min(self.batch_users, max(1, self.max_pairs // width))
            rows = order[lo : lo + step]
            out, cold[rows] = self._score_batch(ids[rows], cand[rows, :width], stats, step)
            logits[rows, :width] = out
            lo += step
        logits[~real] = np.nan
        stats.candidates = int(real.sum())
        for name, value in asdict(stats).items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        return ScoreResult(logits, cold, stats)

    def _graph(self, n_users: int, n_candidates: int) -> GraphedDecoder:
        key = (n_users, n_candidates)
        if key not in self._graphs:  # eager on CPU: only tests flip self.graphs there
            self._graphs[key] = GraphedDecoder(self.resident, self.layout, n_users=n_users, pad_to=self.graph_len,
                                               n_candidates=n_candidates, path=self.path,
                                               eager=self.device.type != "cuda", fused=self.fused_config)
        return self._graphs[key]

    @torch.inference_mode()
    def _score_batch(self, ids: np.ndarray, cand: np.ndarray, stats: RuntimeStats, slots: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        n = len(ids)
        host = self.batcher.fetch(ids, n_slots=slots if self.graphs else None)
        if self.graphs:  # static shapes: `slots` users (cold padding), L = graph_len
            graph = self._graph(slots, cand.shape[1])
            padded = np.zeros((slots, cand.shape[1]), dtype=np.int64)
            padded[:n] = cand
        else:
            dev, cost = to_device(host, self.device)
            targets = torch.from_numpy(cand).to(self.device, non_blocking=False)
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t_dec = time.perf_counter()
        flags = None if self.graphs else torch.zeros(n, dtype=torch.int32, device=self.device)  # bad router index
        if self.graphs:  # one replay: the batch and candidate copies, then the decode
            logits = graph.run(host, padded)[:n]
            cost = graph.last_cost
            flags = graph.flags
        elif self.entry:
            cache = dev.unpack(self.pad_to)  # v2: per-part arrays → the model's ZooCache
            cache = entry_cache(cache, self._store_cfg, self.resident.dtype)
            if self.zoo:
                logits = decode_zoo(self.resident, cache, targets)
            else:  # a din cache in a v2 store: its one group through the din decode paths
                logits = decode(self.resident, cache.kv["kv"], targets, self.path, flags=flags)
        elif self.fused:  # the Triton kernel reads the device batch as it is (no unpack)
            logits = fused_decode(self.resident, dev.raw, self.layout, n, targets, config=self.fused_config,
                                  flags=flags)
        else:
            logits = decode(self.resident, dev.unpack(self.pad_to), targets, self.path, flags=flags)
        if cuda:
            end.record()
        out = logits.float().cpu().numpy()
        bad = np.flatnonzero(flags[:n].cpu().numpy())  # after the logits: no extra sync
        if bad.size:
            raise RouterIndexError(f"a router index outside the pool 0..{self.resident.cfg.collective.pool_size - 1}"
                                   ": the record is corrupt (run `ckv store verify STORE`); nothing of this batch "
                                   "was returned", int(ids[bad[0]]))
        decode_ms = start.elapsed_time(end) if cuda else (time.perf_counter() - t_dec) * 1e3
        if self.graphs:
            decode_ms -= cost.ms  # the graph's copies are timed inside it (TransferCost); copies overlapped
            # with the decode (GraphedDecoder overlap) count once, as h2d: h2d_ms + decode_ms is the replay
        stats.batches += 1
        stats.users += n
        stats.cold_start_users += host.cold_start - (host.n_users - n)
        stats.h2d_bytes += cost.bytes
        stats.fetch_ms += host.fetch_seconds * 1e3
        stats.h2d_ms += cost.ms
        stats.decode_ms += decode_ms
        stats.total_ms += (time.perf_counter() - t0) * 1e3
        return out, ~host.present[:n]
