"""Decode runtime: score requests (user ids + candidate items) against the published cache store.

One :class:`DecodeRuntime` per serving process (create it after fork). It keeps the checkpoint's
scoring model and global K/V pools resident on the device (CUDA when available, else CPU) and
scores a batch in five steps, each measured:

    fetch      StoreReader → reusable (pinned) host buffer, jagged records    cachestore/decode/batch.py
    transfer   one host→device copy, timed with CUDA events                   cachestore/decode/transfer.py
    unpack     jagged records → padded KVCache on the device                  cachestore/decode/transfer.py
    decode     pool lookup / gather + target attention + MLP → logits         cachestore/decode/decode.py
    result     logits back to the host (numpy)

With the resident tier (every model's store; ``ServingConfig.tier_bytes``, :mod:`cachestore.tier`;
on CUDA by default when the store fits) there is no fetch: a step is one CUDA graph replay — user ids in,
lookup on the device, the decode reading the records in place in device memory, scores out. Without it,
a request of several steps fetches step n + 1 on a reader thread while step n decodes. Settings come in
one frozen :class:`cachestore.decode.runtime_config.ServingConfig`; store/checkpoint fit checks live in
:mod:`cachestore.store.layout_check`.

Users absent from the store are scored as cold start (empty history: attention output 0, exactly
``model.decode`` with length 0) and counted; a store built by another model version is refused when
the runtime is created, a record written by another model version when it is fetched (both
``ModelVersionMismatchError``). The store may be the full-KV baseline store (layout mode "full").

One record format (:mod:`cachestore.store.entry`, ``EntryLayout``) holds every model's cache: the ``din``
arch's one K/V group and a zoo model's several K/V groups plus retrieval keys (SIM, ETA, SDIM, TWIN,
HSTU). On CUDA with Triton (path "auto" or "fused") every model's decode reads the copied records in place
(:func:`cachestore.decode.graphs.static_decode`: din's fused kernel, :mod:`cachestore.decode.fused_zoo`,
:mod:`cachestore.decode.fused_hstu`), inside a CUDA graph with ``graphs``. Otherwise a batch is unpacked part by
part (:func:`cachestore.decode.transfer.unpack_entry`), rebuilt with ``model.entry.cache_from_arrays`` and decoded
by the din paths (:func:`cachestore.decode.decode.decode`: poolscore or gather) or the zoo model's own ``decode``
(:func:`cachestore.decode.decode.decode_zoo`). The store's arch and parts must be exactly those
``cachestore.store.entry.entry_layout`` gives for the checkpoint (:func:`check_layout`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from collectivekv.cachestore.decode.batch import FetchedBatch, HostBatcher, RecordFetch
from collectivekv.cachestore.decode.decode import (
    ResidentModel,
    ResidentZooModel,
    decode,
    decode_zoo_batch,
    din_cache,
)
from collectivekv.cachestore.decode.fused import FUSED, fused_available, uses_fused
from collectivekv.cachestore.decode.fused_view import misplaced_part
from collectivekv.cachestore.decode.graphs import GraphedDecoder, static_decode
from collectivekv.cachestore.decode.layer_batch import LayerBatcher, split_layouts
from collectivekv.cachestore.decode.mapped import MappedBatcher
from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.decode.runtime_resident import open_tier, score_resident
from collectivekv.cachestore.decode.runtime_stats import STAT_FIELDS, RuntimeStats, ScoreResult, candidate_mask
from collectivekv.cachestore.decode.transfer import to_device
from collectivekv.cachestore.store.item_ids import ItemIds, UnknownItemError
from collectivekv.cachestore.store.layout_check import check_layout
from collectivekv.cachestore.store.record import RouterIndexError
from collectivekv.cachestore.store.store_tree import check_tree
from collectivekv.cachestore.store.user_keys import user_id_array
from collectivekv.cachestore.tier.graph import ResidentRequest
from collectivekv.cachestore.tier.tier import ResidentTier

if TYPE_CHECKING:
    from collectivekv.cachestore.store.reader import StoreReader


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def version_and_checkpoint(store: str | os.PathLike, checkpoint: str | os.PathLike | None) -> tuple[Path, Path]:
    """(version directory, checkpoint directory) of a store root (its ``current`` version, resolved once) or a
    version directory; checkpoint None: the ``checkpoint/`` that ``ckv refresh`` publishes inside the version."""
    from collectivekv.cachestore.store.publish import CURRENT, open_current

    store = Path(store)
    version_dir = open_current(store) if os.path.lexists(store / CURRENT) else store
    if checkpoint is None:
        checkpoint = version_dir / "checkpoint"
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"{version_dir} has no checkpoint/ (published by ckv refresh): pass one")
    return version_dir, Path(checkpoint)


class DecodeRuntime:
    """Scores batches of requests; see the module docstring.

    config: a :class:`cachestore.decode.runtime_config.ServingConfig` (default: its defaults); keyword
    ``overrides`` replace its fields (``DecodeRuntime(m, v, r, device="cpu", batch_users=4)`` is
    ``DecodeRuntime(m, v, r, ServingConfig(device="cpu", batch_users=4))``); the fields below are the
    config's. :meth:`close` lets go of the device memory, the map registration and the reader. :meth:`score` may
    be called from several threads: requests are scored one at a time (a lock), each whole.

    model / model_version: the checkpoint (``cachestore.checkpoint.load_checkpoint``; any arch whose
    store format the reader's layout is, see the module docstring); the model is moved to ``device``.
    reader: a :class:`cachestore.store.reader.StoreReader` of the store version to serve. path: "auto" |
    "fused" | "poolscore" | "gather" (:mod:`cachestore.decode.decode`; "auto" on CUDA with Triton is "fused" for
    every model; "gather" is the eager reference, a zoo model's own ``decode``; "poolscore" is din's only).
    batch_users: users per fetch/transfer/decode step. max_pairs: at most this many (user, candidate) pairs
    per step (rows are grouped by candidate count; each step is trimmed to its widest row). pad_to: pad every batch
    to this history length (static shapes for CUDA graphs / torch.compile; default: the longest
    history in the batch). verify_crc: walk the store's B-tree once at construction
(:func:`cachestore.store.store_check.check_tree`) and CRC-check every fetched record (off: headers, sizes and
router index bounds only).
    graphs: decode each step by replaying a CUDA graph (:mod:`cachestore.decode.graphs`; CUDA, and for
    a zoo model its fused decode): steps are padded with cold-start slots to a fixed size per candidate width C
    (``min(batch_users, max_pairs // C)``) and to L = pad_to (default: the store's max_len); one
    :class:`GraphedDecoder` per (step size, C), which captures a graph (copies included) per host
    buffer and copy-size bucket on first use. fused_config: the fused
    kernel's launch settings where it runs (:class:`cachestore.decode.fused.FusedConfig`; by default it reads the pool
    rows at the store's kv dtype, ``FusedConfig(pool_dtype="float32")`` reads the model's rows exactly).
    zero_copy (with graphs): fetch with :class:`cachestore.decode.mapped.MappedBatcher` — the CPU looks the users
    up and writes a gather table, the graph gathers the records from the store's LMDB map (registered with
    CUDA: the store file's pages stay pinned in host memory while the runtime serves). On an H100 host at
    L 1,000, B 512 it took a request from 2.09 to 1.47 ms (fetch 1.34 → 0.79 ms, replay 0.18 → 0.21 ms;
    ``benchmarks/results/zero_copy/zero_copy.json``); at L 50 it gains nothing (small records are cheap to copy).
    catalogue: the model's raw → dense item ids (:class:`cachestore.store.item_ids.ItemIds`, from the
    checkpoint's item catalogue) for :meth:`score_raw`; None: the identity (raw id = dense id).
    :meth:`score` takes dense ids (the model's embedding rows).
    """

    def __init__(self, model: torch.nn.Module, model_version: str, reader: StoreReader,
                 config: ServingConfig | None = None, *, catalogue: ItemIds | None = None,
                 **overrides: object) -> None:
        config = (config or ServingConfig()).replace(**overrides) if overrides else (config or ServingConfig())
        self.config = config
        device, path, batch_users, graphs = config.device, config.path, config.batch_users, config.graphs
        zero_copy, pad_to, pin = config.zero_copy, config.pad_to, config.pin
        layout = reader.layout
        check_layout(layout, model, model_version)
        if config.verify_crc:  # the full check: every B-tree page, so that no read can leave the file
            check_tree(reader.version_dir)
        self.device = torch.device(device) if device is not None else default_device()
        self.zoo = getattr(model.cfg, "arch", "din") != "din"
        self.graphs = graphs
        self._graphs: dict[tuple[int, int], GraphedDecoder] = {}  # (step users, candidates) -> graph
        self._widths: set[int] = set()  # candidate widths of the steps scored
        if self.zoo and path == "poolscore":
            raise ValueError(f"path 'poolscore' is the din model's attention; a {model.cfg.arch} model decodes with "
                             "its own attention (use path 'auto' or 'gather')")
        self.resident: ResidentModel | ResidentZooModel = (
            ResidentZooModel(model, self.device) if self.zoo else ResidentModel(model, self.device))
        self.model_version = model_version
        self.reader = reader
        self.layout = layout
        self.path = path
        if path == FUSED and not fused_available(self.device):
            raise ValueError(f"path 'fused' needs Triton on a CUDA device (device {self.device})")
        # "auto" on CUDA with Triton, or "fused": every model and store layout, except under "auto" a zoo store with
        # a part its fused kernels cannot place (int8 codes of odd width before an index or float part: eager path)
        unplaced = self.zoo and misplaced_part(layout) is not None
        self.fused = uses_fused(path, self.device) and not (unplaced and path == "auto")
        if graphs and (self.device.type != "cuda" or (self.zoo and not self.fused)):
            raise ValueError("graphs=True needs a CUDA device (and, for a zoo model, its fused decode: path auto "
                             f"or fused, Triton); got device {self.device}, arch {layout.arch!r}, path {path!r}")
        self.fused_config = config.fused_config
        self.batch_users = batch_users
        self.pad_to = pad_to
        self.graph_len = pad_to or max(1, layout.max_len)  # L of the graphs
        self.max_pairs = config.max_pairs
        pin = (self.device.type == "cuda") if pin is None else pin
        # graphs of an HSTU store's fused decode copy the first layer's bytes first (cachestore.decode.layer_batch)
        split = graphs and self.fused and split_layouts(layout) is not None
        kind = MappedBatcher if zero_copy else LayerBatcher if split else HostBatcher
        self.batcher: RecordFetch = kind(
            layout, reader=reader, expected_model_version=model_version, pin=pin, n_buffers=config.n_buffers,
            batch_users=batch_users, verify_crc=config.verify_crc)
        self.stats = RuntimeStats()
        self.catalogue = catalogue if catalogue is not None else ItemIds.identity(model.cfg.n_items)
        self._resident: dict[tuple[int, int], ResidentRequest] = {}  # (step users, candidates) -> request
        self._score_lock, self._closed = threading.Lock(), False
        self._reader: ThreadPoolExecutor | None = None  # the pipelined fetch's thread (created on first use)
        self._evictions_seen = self._errors_seen = 0  # tier totals already counted in a batch's stats
        self.tier: ResidentTier | None = open_tier(self)  # the resident tier, when config.tier_bytes gives room

    @classmethod
    def open(cls, store: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
             config: ServingConfig | None = None, *, catalogue: ItemIds | None = None,
             **overrides: object) -> DecodeRuntime:
        """A runtime for a store (a root: its ``current`` version, resolved once; or a version directory) and a
        checkpoint (None: the ``checkpoint/`` ``ckv refresh`` published in the same version: records and model of one
        version), served with ``config`` updated by ``overrides``; the checkpoint's catalogue unless one is given."""
        from collectivekv.cachestore.checkpoint import load_checkpoint
        from collectivekv.cachestore.store.reader import StoreReader

        version_dir, checkpoint = version_and_checkpoint(store, checkpoint)
        ckpt = load_checkpoint(checkpoint, device="cpu")
        catalogue = catalogue if catalogue is not None else ckpt.item_catalogue.item_ids()
        return cls(ckpt.model, ckpt.model_version, StoreReader(version_dir), config, catalogue=catalogue,
                   **overrides)

    @property
    def version_id(self) -> str:
        """The served store version's directory name."""
        return self.reader.version_id

    @property
    def version_dir(self) -> Path:
        """The served store version's directory (a shard's, for one shard of a sharded version)."""
        return self.reader.version_dir

    def close(self) -> None:
        """Let go of the tier's device memory and admission thread, the zero-copy map registration, the graphs, the
        reader's LMDB environment — after the request in flight; a later :meth:`score` raises RuntimeError."""
        with getattr(self, "_score_lock", threading.Lock()):
            self._closed = True
            tier, self.tier = getattr(self, "tier", None), None
            if tier is not None:
                tier.close()
            if self._reader is not None:
                self._reader.shutdown(wait=True)
                self._reader = None
            self.batcher.close()
            self._graphs.clear()
            self._resident.clear()
            self.reader.close()

    def __enter__(self) -> DecodeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_targets(self, targets: np.ndarray) -> None:
        n_items = self.resident.cfg.n_items
        if targets.size and (int(targets.min()) < 0 or int(targets.max()) > n_items):
            bad = targets[(targets < 0) | (targets > n_items)][0]
            raise ValueError(f"candidate item {int(bad)} outside the model's items 0..{n_items} (0 = padding)")

    def score(self, user_ids: np.ndarray | list[int], candidates: np.ndarray | list, n_candidates=None) -> ScoreResult:
        """Score candidates (B, C) (or (B,): one each) of users (B,). ``n_candidates`` (B,): how many
        leading entries of each row are real (default all); padded entries get logit NaN."""
        ids = user_id_array(user_ids)  # UserKeyError (a ValueError) naming a negative, too large or non-integer id
        cand = np.asarray(candidates, dtype=np.int64)
        cand = cand.reshape(-1, 1) if cand.ndim == 1 else cand
        if cand.shape[0] != len(ids):
            raise ValueError(f"{cand.shape[0]} candidate rows for {len(ids)} users")
        real = candidate_mask(cand.shape, n_candidates)  # (B, C) bool
        cand, n_cols = np.where(real, cand, 0), cand.shape[1]
        if n_cols == 0:  # no candidates: the users are still looked up (cold-start flags) over one padded column
            cand, real = np.zeros((len(ids), 1), dtype=np.int64), np.zeros((len(ids), 1), dtype=bool)
        self._check_targets(cand)
        logits = np.full(cand.shape, np.nan, dtype=np.float32)
        cold = np.zeros(len(ids), dtype=bool)
        stats = RuntimeStats()
        counts = real.sum(1)
        # rows with similar candidate counts share a step; each step is trimmed to its widest row and
        # holds at most max_pairs (user, candidate) pairs (attention scores grow with B·C·H·L)
        order = np.argsort(-counts, kind="stable")
        steps, lo = [], 0
        while lo < len(ids):
            width = max(1, int(counts[order[lo]]))
            step = min(self.batch_users, max(1, self.max_pairs // width))
            steps.append((order[lo : lo + step], width, step))
            lo += step
        stats.candidates = int(real.sum())
        with self._score_lock:  # one request at a time: the host buffers and the graphs' static buffers are shared
            if self._closed:
                raise RuntimeError(f"the runtime of store version {self.version_id} is closed")
            for (rows, width, step), host in zip(steps, self._fetches(ids, steps), strict=True):
                self._widths.add(width)
                out, cold[rows] = self._score_batch(ids[rows], cand[rows, :width], stats, step, host)
                logits[rows, :width] = out
            total = self.stats
            for name in STAT_FIELDS:  # (not asdict: it deep-copies, ~20 µs a request)
                setattr(total, name, getattr(total, name) + getattr(stats, name))
        logits[~real] = np.nan
        return ScoreResult(logits[:, :n_cols], cold, stats, self.model_version)

    def candidate_widths(self) -> list[int]:
        """The candidate widths C of the steps scored so far (with graphs: one graph each): a version loaded to
        replace this one warms the same widths (:func:`cachestore.serving.versions.load_version`)."""
        return sorted(self._widths)

    def _fetches(self, ids: np.ndarray, steps: list[tuple[np.ndarray, int, int]]) -> Iterator[FetchedBatch | None]:
        """The host batch of each step, in order: fetched one step ahead on the reader thread (pipelining: the
        reader looks up and copies step i + 1 while step i decodes) when the runtime fetches from LMDB with a
        ring of >= 2 buffers and there are several steps; None (fetched in the step) otherwise. The resident
        tier resolves inside its step (whole store: on the device; cache mode: under the tier's lock)."""
        if self.tier is not None or self.config.n_buffers < 2 or len(steps) < 2:
            yield from (None for _ in steps)
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="ckv-fetch")

        def fetch(i: int) -> FetchedBatch:
            rows, _, slots = steps[i]
            return self.batcher.fetch(ids[rows], n_slots=slots if self.graphs else None)

        ahead = self._reader.submit(fetch, 0)
        for i in range(len(steps)):
            host = ahead.result()  # the previous step is done: its buffer may come round again
            if i + 1 < len(steps):
                ahead = self._reader.submit(fetch, i + 1)
            yield host

    def score_raw(self, user_ids: np.ndarray | list[int], candidates: np.ndarray | list,
                  n_candidates=None) -> ScoreResult:
        """:meth:`score` with candidates given by raw item id (the event log's), mapped through
        ``catalogue``. An unknown raw id raises :class:`cachestore.store.item_ids.UnknownItemError`
        (``position``: its flat index in ``candidates``); padded entries are not looked up."""
        cand = np.asarray(candidates, dtype=np.int64)
        cand = cand.reshape(-1, 1) if cand.ndim == 1 else cand
        real = candidate_mask(cand.shape, n_candidates)  # (B, C) bool
        flat = np.flatnonzero(real.reshape(-1))
        dense = np.zeros(cand.size, dtype=np.int64)
        try:
            dense[flat] = self.catalogue.to_dense(cand.reshape(-1)[flat], where="candidates")
        except UnknownItemError as exc:
            pos = int(flat[exc.position])
            raise UnknownItemError(exc.raw, pos, f"{exc} (user slot {pos // cand.shape[1]}, column "
                                   f"{pos % cand.shape[1]})") from None
        return self.score(user_ids, dense.reshape(cand.shape), n_candidates)

    def _graph(self, n_users: int, n_candidates: int) -> GraphedDecoder:
        key = (n_users, n_candidates)
        if key not in self._graphs:  # eager on CPU: only tests flip self.graphs there
            self._graphs[key] = GraphedDecoder(self.resident, self.layout, n_users=n_users, pad_to=self.graph_len,
                                               n_candidates=n_candidates, path=self.path,
                                               eager=self.device.type != "cuda", fused=self.fused_config)
        return self._graphs[key]

    @torch.inference_mode()
    def _score_batch(self, ids: np.ndarray, cand: np.ndarray, stats: RuntimeStats, slots: int,
                     host: FetchedBatch | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.tier is not None:
            return score_resident(self, ids, cand, stats, slots)
        t0 = time.perf_counter()
        n = len(ids)
        if host is None:
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
        # per-user "router index outside the pool" flags of every decode path (the graph has its own)
        eager_zoo = self.zoo and not self.fused
        flags = None if self.graphs else torch.zeros(n, dtype=torch.int32, device=self.device)
        if self.graphs:  # one replay: the batch and candidate copies, then the decode
            logits = graph.run(host, padded)[:n]
            cost = graph.last_cost
            flags = graph.flags
        elif eager_zoo:  # per-part arrays → the model's ZooCache
            logits = decode_zoo_batch(self.resident, dev.unpack(self.pad_to), self.layout, targets, flags)
        elif self.fused:  # the Triton kernels read the device batch as it is (no unpack)
            logits = static_decode(dev.raw, targets, resident=self.resident, layout=self.layout, n_users=n,
                                   pad_to=self.graph_len, path=FUSED, fused=self.fused_config, flags=flags)
        else:
            logits = decode(self.resident, din_cache(dev.unpack(self.pad_to)), targets, self.path, flags=flags)
        if cuda:
            end.record()
        out = logits.float().cpu().numpy()
        if flags is not None:
            self._check_flags(np.flatnonzero(flags[:n].cpu().numpy()), ids)  # after the logits: no extra sync
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

    def _check_flags(self, bad: np.ndarray, ids: np.ndarray) -> None:
        """Refuse a batch in which the decode met a router index outside the pool (``bad``: slots, from the
        kernel's or the eager decode's per-user flags)."""
        if bad.size:
            raise RouterIndexError(f"a router index outside the pool 0..{self.resident.cfg.collective.pool_size - 1}"
                                   ": the record is corrupt (run `ckv store verify STORE`); nothing of this batch "
                                   "was returned", int(ids[bad[0]]))
