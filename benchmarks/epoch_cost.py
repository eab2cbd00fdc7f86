"""CPU cost of `ckv eval`'s training steps on two datasets, to scale a measured GPU run from one to the other.

For each dataset and (model, K/V mode) of ``--runs``, times ``--steps`` training steps (after one warm-up step)
at `ckv eval`'s default dims (embed 64, d_a 256, 8 heads, short window 50, long window 1,000, top-k 50,
pool 10,000, HSTU window 100, batch 1,024) on random batches of the training split, and reports seconds
per step, the mean padded window of the batches, and the CPU seconds of one epoch (steps per epoch x seconds
per step). The ratio of two datasets' epoch seconds, times a GPU epoch measured on one, estimates the other.

``--estimate SCALE`` times nothing: it scales the H100 MovieLens run records of the paper recipe
(benchmarks/results/zoo_movielens) and of the regularised recipe (zoo_movielens_regularised) by SCALE (the
ratio of training steps per epoch) and prints the Table 1 cost per recipe: the sum over the 10 configs of the
median seconds per epoch, one epoch of all 30 runs (3 seeds), the total at the records' mean epochs per
config, and that total over the number of workers. The paper recipe's full rows use the regularised run's
full records (the same shapes; dropout only).

    python benchmarks/epoch_cost.py --data runs/movielens_data --data runs/synth_default \
        --out benchmarks/results/synthetic_ctr/epoch_cost.json
    python benchmarks/epoch_cost.py --estimate 119.58
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


RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = (("paper", "zoo_movielens", 3), ("regularised", "zoo_movielens_regularised", 4))


def run_records(name: str) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """(median seconds per epoch, mean epochs trained) per (arch, kv_mode) of a results directory's runs."""
    seconds: dict[tuple[str, str], list[float]] = {}
    epochs: dict[tuple[str, str], list[int]] = {}
    for path in sorted((RESULTS / name / "runs").glob("*.json")):
        rec = json.loads(path.read_text())
        key = (rec["arch"], rec["config"].get("kv_mode", "full"))
        seconds.setdefault(key, []).append(rec["train_seconds"] / len(rec["history"]))
        epochs.setdefault(key, []).append(len(rec["history"]))
    return ({k: float(np.median(v)) for k, v in seconds.items()}, {k: float(np.mean(v)) for k, v in epochs.items()})


def estimate(scale: float, seeds: int = 3) -> list[dict[str, float | str]]:
    """The Table 1 cost per recipe at ``scale`` x MovieLens' steps per epoch (module docstring)."""
    reg_seconds, _ = run_records(RECIPES[1][1])
    rows = []
    for recipe, name, workers in RECIPES:
        seconds, epochs = run_records(name)
        seconds = {k: reg_seconds[k] if k[1] == "full" else v for k, v in seconds.items()}
        per_epoch = sum(seconds.values())
        total_h = sum(seconds[k] * epochs[k] for k in seconds) * seeds * scale / 3600
        fastest, slowest = min(seconds.values()) * scale / 60, max(seconds.values()) * scale / 60
        rows.append({"recipe": recipe, "movielens_epoch_s": round(per_epoch, 1),
                     "epoch_all_runs_h": round(per_epoch * seeds * scale / 3600, 1), "total_run_h": round(total_h, 1),
                     "workers": workers, "wall_h": round(total_h / workers, 1),
                     "run_epoch_min": f"{fastest:.1f}-{slowest:.1f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", type=Path, default=[], help="a canonical dataset (repeatable)")
    ap.add_argument("--estimate", type=float, default=None, help="scale the GPU run records instead (docstring)")
    ap.add_argument("--runs", default="sim:full,sim:collective,hstu:full",
                    help="arch:kv_mode pairs (HSTU collective at batch 1,024 needs ~15 GB of host memory on a CPU)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.estimate is not None:
        for row in estimate(args.estimate):
            print(json.dumps(row))
        return
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
