"""A din and a SIM store of a kv_index=joint, user_dtype=int8 model at the paper's dims (d_a 256, d_u 1, pool
10,000), 20 users with full windows of random items, for `ckv report size OUT/{din,sim}/store` (sizes only: the
model is untrained, its int8 scales observed on one batch).
Usage: python benchmarks/half_cache_sizes.py OUT"""
import dataclasses
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
from collectivekv.cachestore.store.record import write_layout
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.zoo import create_model
from collectivekv.pipeline.prefill.prefill import cache_layout, prefill_batches
from collectivekv.pipeline.store.store_ops import build_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.pipeline.prefill.prefill_helpers import histories

out = Path(sys.argv[1])
for arch, kw in (("din", {}), ("sim", dict(max_len=50, long_len=1000, n_genres=6))):
    cfg = ModelConfig(n_items=500, d_attn=256, collective=CollectiveConfig(d_user=1, pool_size=10_000), arch=arch,
                      kv_index="joint", user_dtype="int8", **kw)
    torch.manual_seed(0)
    model = create_model(cfg)
    lengths = [cfg.window_len] * 20
    batch = histories(lengths, seed=1, n_items=500)
    w = min(cfg.window_len, 64)
    model.train()
    with torch.no_grad():  # observe the int8 scales on one batch (a trained checkpoint holds them)
        items, fb = torch.randint(1, 501, (4, w)), torch.randint(1, 3, (4, w))
        model(items, fb, torch.full((4,), w), torch.randint(1, 501, (4,)))
    model.eval()
    root = out / arch
    version = save_checkpoint(root / "ckpt", model, {})
    layout = cache_layout(cfg, version)
    pdir = root / "parquet"
    pdir.mkdir(parents=True)
    pq.write_table(pa.Table.from_batches(list(prefill_batches([batch], model, layout, 5))), pdir / "part-0.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    build_store(root / "store", pdir, prefill={"model_config": dataclasses.asdict(cfg), "mode": "collective"},
                command_line="halfdemo")
    print(arch, "built", root / "store")
