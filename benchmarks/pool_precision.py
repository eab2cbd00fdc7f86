"""Accuracy of serving with half-precision pool rows (``FusedConfig.pool_dtype``) on real data.

    make demo        # or any `ckv train` checkpoint and `ckv data prepare` dataset
    python benchmarks/pool_precision.py --checkpoint runs/demo/experiment/checkpoints/collective-seed0 \\
        --data runs/demo/data                      # -> benchmarks/results/pool_precision/pool_precision.json

The fused kernel with ``pool_dtype`` float16 / bfloat16 reads the global K/V pool rows rounded to that
dtype and nothing else changes (user parts, indices, query, MLP stay as stored / fp32). This script
applies exactly that rounding to the checkpoint's pools and evaluates the model (hard routing, as
served) on the dataset's validation and test samples: GAUC, AUC and logloss per pool dtype, their
change against the fp32 pools, and the largest change of a predicted probability. CPU is enough.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import machine  # noqa: E402
from collectivekv.cachestore.checkpoint import load_checkpoint  # noqa: E402
from collectivekv.model.metrics import ctr_metrics  # noqa: E402
from collectivekv.pipeline.data.dataset_schema import load_dataset  # noqa: E402
from collectivekv.pipeline.data.history import HistoryIndex  # noqa: E402
from collectivekv.pipeline.training.trainer import predict  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def pools(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The model's global pool parameters (K and/or V; none for a full-KV model)."""
    branches = (getattr(model, "k_branch", None), getattr(model, "v_branch", None))
    return [b.pool for b in branches if b is not None and b.pool is not None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a collective checkpoint directory (ckv train)")
    p.add_argument("--data", required=True, help="the dataset directory it was trained on (ckv data prepare)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pool_precision/pool_precision.json")
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model.eval()
    params = pools(model)
    if not params:
        raise SystemExit(f"{args.checkpoint}: the model has no global pool (a full-KV checkpoint)")
    dataset = load_dataset(args.data)
    index = HistoryIndex(dataset.histories)
    exact = [q.detach().clone() for q in params]
    out: dict = {"benchmark": "pool_precision", "machine": machine(torch.device("cpu")), "command": " ".join(sys.argv),
                 "checkpoint": str(args.checkpoint), "model_version": ckpt.model_version,
                 "pool_shapes": [list(q.shape) for q in params], "splits": {}}
    for split in ("valid", "test"):
        samples = dataset.samples[split]
        users, labels = samples.column("user_id").to_numpy(), samples.column("label").to_numpy()
        rows, probs = {}, {}
        for name in ("float32", *DTYPES):
            with torch.no_grad():
                for q, x in zip(params, exact, strict=True):  # the rows the kernel reads at that dtype
                    q.copy_(x if name == "float32" else x.to(DTYPES[name]).float())
            probs[name] = predict(model, index, samples, args.batch_size)
            rows[name] = ctr_metrics(users, labels, probs[name])
        for name in DTYPES:
            rows[name]["delta_vs_float32"] = {k: rows[name][k] - rows["float32"][k] for k in rows["float32"]}
            rows[name]["max_abs_prob_diff"] = float(np.abs(probs[name] - probs["float32"]).max())
        out["splits"][split] = {"samples": samples.num_rows, **rows}
        print(f"{split} ({samples.num_rows} samples): " + "  ".join(
            f"{n}: gauc {r['gauc']:.5f} auc {r['auc']:.5f} logloss {r['logloss']:.5f}" for n, r in rows.items()),
            flush=True)
    with torch.no_grad():
        for q, x in zip(params, exact, strict=True):
            q.copy_(x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
