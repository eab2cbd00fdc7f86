"""CPU cost of `ckv eval`'s training steps on two datasets, to scale a measured GPU run from one to the other.

For each dataset and (model, K/V mode) of ``--runs``, times ``--steps`` training steps (after one warm-up step)
at `ckv eval`'s default dims (embed 64, d_a 256, 8 heads, short window 50, long window 1,000, top-k 50,
pool 10,000, HSTU window 100, batch 1,024) on random batches of the training split, and reports seconds
per step, the mean padded window of the batches, and the CPU seconds of one epoch (steps per epoch x seconds
per step). The ratio of two datasets' epoch seconds, times a GPU epoch measured on one, estimates the other.

    python benchmarks/epoch_cost.py --data runs/movielens_data --data runs/synth_default \
        --out benchmarks/results/synthetic_ctr/epoch_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.events import EventSpec
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.data.history import HistoryIndex
from collectivekv.pipeline.training.trainer import build_model, sample_batches

EVAL_DIMS = {"embed_dim": 64, "d_attn": 256, "n_heads": 8, "max_len": 50, "long_len": 1000, "topk": 50}
HSTU_LEN = 100


def config(arch: str, kv_mode: str) -> ModelConfig:
    dims = {**EVAL_DIMS, **({"max_len": HSTU_LEN} if arch == "hstu" else {})}
    return ModelConfig(n_items=1, arch=arch, kv_mode=kv_mode, collective=CollectiveConfig(d_user=1, pool_size=10_000),
                       **dims)


def time_steps(data: Path, arch: str, kv_mode: str, steps: int, batch: int) -> dict[str, float | int | str]:
    ds = load_dataset(data, validate=False)
    model = build_model(ds, config(arch, kv_mode), seed=0)
    index = HistoryIndex(ds.histories, EventSpec.of(model.cfg))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = ds.samples["train"]
    batches = sample_batches(index, train, model.cfg.window_len, batch, np.random.default_rng(0))
    widths, seconds = [], []
    for k in range(steps + 1):
        b = next(batches)
        widths.append(int(b["lengths"].max()))
        t = time.perf_counter()
        logits, losses = model(b["items"], b["feedback"], b["lengths"], b["targets"])
        loss = model.loss(logits, b["labels"], losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k:  # the first step warms up
            seconds.append(time.perf_counter() - t)
    per_step = float(np.mean(seconds))
    n_steps = -(-train.num_rows // batch)
    return {"data": str(data), "arch": arch, "kv_mode": kv_mode, "train_samples": train.num_rows,
            "steps_timed": steps, "seconds_per_step": round(per_step, 3), "mean_window": float(np.mean(widths[1:])),
            "cpu_epoch_seconds": round(per_step * n_steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", type=Path, required=True, help="a canonical dataset (repeatable)")
    ap.add_argument("--runs", default="sim:full,sim:collective,hstu:full",
                    help="arch:kv_mode pairs (HSTU collective at batch 1,024 needs ~15 GB of host memory on a CPU)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for data in args.data:
        for run in args.runs.split(","):
            arch, mode = run.split(":")
            rows.append(time_steps(data, arch, mode, args.steps, args.batch))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
