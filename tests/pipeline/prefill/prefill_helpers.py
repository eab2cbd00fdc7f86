"""Helpers shared by the prefill tests (and the store, serving and reliability tests that prefill a small din
model): the model and its config, histories as the prefill job reads them, a run of the per-partition function,
its rows decoded through the store's checks, the model's own K/V to compare with, and prefill Parquet on disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from collectivekv.cachestore.store.entry import decode_entry, entry_from_parquet_row
from collectivekv.cachestore.store.record import write_layout
from collectivekv.model.cache import KVCache
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.pipeline.data.history import arrow_window
from collectivekv.pipeline.prefill.prefill import OUTPUT_SCHEMA, make_engine, prefill_batches

N_ITEMS = 40
MV = "0123456789abcdef"


def small_config(**kw: object) -> ModelConfig:
    base = ModelConfig(n_items=N_ITEMS, n_genres=5, max_genres=3, embed_dim=16, d_attn=32, n_heads=4, max_len=8,
                       mlp_dims=(16,), collective=CollectiveConfig(d_user=2, pool_size=12))
    return dataclasses.replace(base, **kw)


def make_model(cfg: ModelConfig, seed: int = 0) -> TargetAttentionCTR:
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(0, cfg.n_genres + 1, (cfg.n_items + 1, cfg.max_genres), generator=g)
    genres[0] = 0
    torch.manual_seed(seed)
    return TargetAttentionCTR(cfg, genres).eval()


def histories(lengths: list[int], seed: int = 0, first_user: int = 100, n_items: int = N_ITEMS) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    items = [rng.integers(1, n_items + 1, n).astype(np.int32).tolist() for n in lengths]
    labels = [rng.integers(0, 2, n).astype(np.int8).tolist() for n in lengths]
    ts = [list(range(n)) for n in lengths]
    return pa.RecordBatch.from_arrays(
        [pa.array(np.arange(first_user, first_user + len(lengths), dtype=np.int64)),
         pa.array(items, pa.list_(pa.int32())), pa.array(ts, pa.list_(pa.int64())),
         pa.array(labels, pa.list_(pa.int8()))],
        names=["user_id", "items", "timestamps", "labels"])


LENGTHS = [0, 1, 2, 5, 8, 9, 20, 3, 0, 1, 13, 7]


def run(model, layout, batch, engine="auto", batch_users=0) -> pa.Table:
    eng = make_engine(model, layout, engine)
    return pa.Table.from_batches(list(prefill_batches([batch], eng, layout, batch_users)), schema=OUTPUT_SCHEMA)


def decoded(table: pa.Table, layout) -> dict[int, object]:
    """Each output row through the store's own checks (checksum, sizes, model version) and decoder."""
    out = {}
    for row in table.to_pylist():
        rec = entry_from_parquet_row(layout, **row)
        out[row["user_id"]] = decode_entry(layout, rec, expected_model_version=layout.model_version)
    return out


def reference(model, batch: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
    w = arrow_window(batch.column("items"), batch.column("labels"), model.cfg.max_len)
    with torch.inference_mode():
        cache = model.prefill(torch.from_numpy(w.items), torch.from_numpy(w.feedback), torch.from_numpy(w.lengths))
        k, v = model.keys_values(cache)
    return k, v, torch.from_numpy(w.lengths), cache


def write_prefill(tmp: Path, model, layout, batches: list[pa.RecordBatch]) -> Path:
    out = tmp / "prefill"
    out.mkdir()
    for i, b in enumerate(batches):
        pq.write_table(pa.Table.from_batches(list(prefill_batches([b], model, layout))), out / f"part-{i}.parquet")
    write_layout(out / "_layout.json", layout)
    return out
