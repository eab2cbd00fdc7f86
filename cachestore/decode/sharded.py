"""Serving a store of any shape: :func:`open_runtime` opens a whole unsharded version as one
:class:`cachestore.decode.runtime.DecodeRuntime`, or the chosen shards of a sharded version as a
:class:`ShardSetRuntime`.

A sharded version (:mod:`cachestore.store.shards`) is served by shard: a process opens one shard (the usual
deployment: one shard per host or per GPU, requests routed by the shard function) or a set
(``ServingConfig.shards``, ``ckv serve --shards 0,3``). Each opened shard is a complete
:class:`DecodeRuntime` over its own :class:`cachestore.store.reader.StoreReader` (every fetch path, the resident
tier and CUDA graphs work per shard; the model is loaded once and shared, the tier budget split evenly); a
request is split by owning shard, each part scored by its shard's runtime, the results put back in request
order. A user of a shard this process does not open raises :class:`cachestore.store.shards.WrongShardError`
naming the owner, before anything is scored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.decode.runtime_stats import STAT_FIELDS, RuntimeStats, ScoreResult
from collectivekv.cachestore.store.item_ids import ItemIds
from collectivekv.cachestore.store.shard_version import check_shard_identity, version_shards
from collectivekv.cachestore.store.shards import check_owned
from collectivekv.cachestore.store.user_keys import user_id_array


class ShardSetRuntime:
    """Scores requests over the opened shards of one sharded store version (module docstring).

    ``runtimes``: shard index -> the runtime of that shard; ``count``: the version's number of shards.
    Exposes what callers of a :class:`DecodeRuntime` read: ``score``, ``score_raw``, ``model_version``, ``resident``,
    ``catalogue``, ``device``, ``stats`` (summed), ``version_dir`` / ``version_id`` (the whole version's),
    ``close``.
    """

    def __init__(self, version_dir: Path, count: int, runtimes: dict[int, DecodeRuntime]) -> None:
        if not runtimes:
            raise ValueError("a shard set needs at least one shard")
        self.version_dir, self.count = Path(version_dir), count
        self.runtimes = dict(sorted(runtimes.items()))
        self.served = tuple(self.runtimes)
        first = next(iter(self.runtimes.values()))
        self.model_version, self.resident, self.catalogue = first.model_version, first.resident, first.catalogue
        self.device, self.config = first.device, first.config

    @property
    def version_id(self) -> str:
        return self.version_dir.name

    @property
    def stats(self) -> RuntimeStats:
        total = RuntimeStats()
        for rt in self.runtimes.values():
            for name in STAT_FIELDS:
                setattr(total, name, getattr(total, name) + getattr(rt.stats, name))
        return total

    def check_owned(self, user_ids: np.ndarray) -> np.ndarray:
        """The owning shard of each user; WrongShardError for the first user no opened shard owns."""
        return check_owned(user_id_array(user_ids), self.count, self.served)

    def score(self, user_ids: np.ndarray | list[int], candidates: np.ndarray | list,
              n_candidates: np.ndarray | list | None = None) -> ScoreResult:
        """:meth:`DecodeRuntime.score` over the opened shards: (B,) users, (B, C) or (B,) candidates."""
        ids = user_id_array(user_ids)
        cand = np.asarray(candidates, dtype=np.int64)
        cand = cand.reshape(-1, 1) if cand.ndim == 1 else cand
        if cand.shape[0] != len(ids):
            raise ValueError(f"{cand.shape[0]} candidate rows for {len(ids)} users")
        owners = self.check_owned(ids)
        if len(self.runtimes) == 1:
            return next(iter(self.runtimes.values())).score(ids, cand, n_candidates)
        n_cand = None if n_candidates is None else np.asarray(n_candidates, dtype=np.int64).reshape(-1)
        logits = np.full(cand.shape, np.nan, dtype=np.float32)
        cold = np.zeros(len(ids), dtype=bool)
        stats = RuntimeStats()
        for k, rt in self.runtimes.items():
            rows = np.flatnonzero(owners == k)
            if rows.size == 0:
                continue
            part = rt.score(ids[rows], cand[rows], None if n_cand is None else n_cand[rows])
            logits[rows], cold[rows] = part.logits, part.cold_start
            for name in STAT_FIELDS:
                setattr(stats, name, getattr(stats, name) + getattr(part.stats, name))
        return ScoreResult(logits, cold, stats, self.model_version)

    score_raw = DecodeRuntime.score_raw  # raw item ids through ``catalogue``, then :meth:`score`

    def candidate_widths(self) -> list[int]:
        """Every shard's :meth:`DecodeRuntime.candidate_widths`, together."""
        return sorted({c for rt in self.runtimes.values() for c in rt.candidate_widths()})

    def close(self) -> None:
        for rt in self.runtimes.values():
            rt.close()

    def __enter__(self) -> ShardSetRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_runtime(store: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 config: ServingConfig | None = None, *, catalogue: ItemIds | None = None,
                 **overrides: object) -> DecodeRuntime | ShardSetRuntime:
    """A runtime for a store root (its ``current`` version, resolved once) or a version directory: a
    :class:`DecodeRuntime` for an unsharded version, a :class:`ShardSetRuntime` over ``config.shards``
    (None: every shard) of a sharded one. ``checkpoint``: as :meth:`DecodeRuntime.open`."""
    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.cachestore.decode.runtime import version_and_checkpoint
    from collectivekv.cachestore.store.reader import StoreReader

    config = (config or ServingConfig()).replace(**overrides)
    version_dir, checkpoint = version_and_checkpoint(store, checkpoint)
    shards = version_shards(version_dir)
    if shards is None:
        if config.shards not in (None, (0,)):
            raise ValueError(f"{version_dir} is not sharded: it has shard 0 only, not {config.shards}")
        return DecodeRuntime.open(version_dir, checkpoint, config, catalogue=catalogue)
    selected = shards.select(config.shards)
    ckpt = load_checkpoint(checkpoint, device="cpu")
    catalogue = catalogue if catalogue is not None else ckpt.item_catalogue.item_ids()
    tier_bytes = None if config.tier_bytes is None else config.tier_bytes // len(selected)  # one budget, split
    per_shard = config.replace(tier_share=config.tier_share / len(selected), tier_bytes=tier_bytes)
    runtimes: dict[int, DecodeRuntime] = {}
    try:
        for k in selected:
            check_shard_identity(shards, k)
            runtimes[k] = DecodeRuntime(ckpt.model, ckpt.model_version, StoreReader(shards.dir(k)), per_shard,
                                        catalogue=catalogue)
    except BaseException:
        for rt in runtimes.values():
            rt.close()
        raise
    return ShardSetRuntime(version_dir, shards.count, runtimes)
