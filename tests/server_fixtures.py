"""Test helpers for the serving process: stores published with their checkpoint (as ``ckv refresh``
publishes them), the scores each version must give, and a real server on 127.0.0.1.

A :class:`ModelStore` is one model version: a small din model, its checkpoint, and the histories of
users 100..100+n-1; ``publish`` puts its records and checkpoint into one new version of a store root.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.server import RunningServer
from collectivekv.cachestore.store.entry import read_layout
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, prefill_schema
from collectivekv.cachestore.store.publish import build_version, new_staging_dir, publish
from collectivekv.cachestore.store.record import write_layout
from collectivekv.cachestore.store.shard_build import ShardTarget, build_shard, shard_schema
from collectivekv.pipeline.store.shard_ops import shard_rows
from collectivekv.pipeline.store.store_ops import publish_sharded
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.cachestore.decode.serving_helpers import histories
from tests.model.test_model import make_model, small_config
from tests.store_fixtures import layout_for, prefill_rows

SEQ = 8  # small_config max_len
FIRST_USER = 100
COLD_USERS = (1, 2, 99999)  # never in a store


@dataclass
class ModelStore:
    """One model version and the users it prefills (ids FIRST_USER.. FIRST_USER + n_users - 1)."""

    model: torch.nn.Module
    checkpoint: Path
    model_version: str
    items: torch.Tensor
    feedback: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def make(cls, work: Path, seed: int, n_users: int = 24) -> ModelStore:
        model = make_model(small_config(kv_mode="collective"), seed=seed).eval()
        ckpt = Path(work) / f"checkpoint-{seed}"
        version = save_checkpoint(ckpt, model, {})
        return cls(model, ckpt, version, *histories(n_users, seed))

    @property
    def user_ids(self) -> list[int]:
        return list(range(FIRST_USER, FIRST_USER + len(self.lengths)))

    def publish(self, root: Path, checkpoint: Path | None = None) -> str:
        """Publish this model's records with a checkpoint (default its own) as a new version of root;
        returns the version id."""
        layout = layout_for(self.model, self.model_version, "collective", "float32")
        rows = prefill_rows(self.model, layout, self.user_ids, self.items, self.feedback, self.lengths)
        pdir = self.parquet_dir(root)  # beside the store root: a store root holds only what ckv writes
        shutil.rmtree(pdir, ignore_errors=True)
        pdir.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=prefill_schema()), pdir / "part-00000.parquet")
        write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
        staging = new_staging_dir(root)
        build_version(pdir, staging, parquet="none")
        shutil.copytree(checkpoint or self.checkpoint, staging / "checkpoint")
        return publish(root, staging).version_id

    def parquet_dir(self, root: Path) -> Path:
        """Where :meth:`publish` writes this model's prefill Parquet for the store ``root``."""
        return Path(root).parent / f"{Path(root).name}.parquet-{self.model_version}"

    def expected(self, user_ids: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's forward for these users (absent ones: empty history): probabilities (B, C) and
        cold-start flags (B,)."""
        rows = [u - FIRST_USER if FIRST_USER <= u < FIRST_USER + len(self.lengths) else None for u in user_ids]
        zero = torch.zeros(1, SEQ, dtype=torch.long)
        items = torch.cat([self.items[r : r + 1] if r is not None else zero for r in rows])
        feedback = torch.cat([self.feedback[r : r + 1] if r is not None else zero for r in rows])
        lengths = torch.tensor([int(self.lengths[r]) if r is not None else 0 for r in rows])
        with torch.no_grad():
            logits = self.model(items, feedback, lengths, torch.from_numpy(np.asarray(candidates)))[0].numpy()
        return 1.0 / (1.0 + np.exp(-logits)), np.array([r is None for r in rows])


def start_server(store: Path, **overrides: object) -> RunningServer:
    """A real server on 127.0.0.1 (a free port) for the store root, scoring on the CPU."""
    settings = dict(port=0, max_wait_ms=2.0, poll_s=0.05, runtime=ServingConfig(device="cpu", batch_users=64))
    settings.update(overrides)
    return RunningServer(ServerConfig(store=Path(store), **settings))


SHARD_COUNT = 2
SHARD_USERS = 16


def publish_sharded_with_checkpoint(model: ModelStore, root: Path) -> None:
    """The model's records as a SHARD_COUNT-shard version with its checkpoint inside (as ``ckv refresh --shards``)."""
    model.publish(root / "seed")
    parquet = model.parquet_dir(root / "seed")
    layout = read_layout(parquet / PARQUET_LAYOUT_FILE)
    files = sorted(parquet.glob("*.parquet"))
    assert pq.read_metadata(files[0]).num_rows == SHARD_USERS
    staging = new_staging_dir(root / "store")
    entries = [build_shard(shard_rows(files, shard_schema(), k, SHARD_COUNT).to_batches(), shard_schema(),
                           ShardTarget(staging, k, SHARD_COUNT, layout)) for k in range(SHARD_COUNT)]
    shutil.copytree(model.checkpoint, staging / "checkpoint")
    publish_sharded(root / "store", staging, layout, entries, SHARD_COUNT, prefill=None, command_line="test")
