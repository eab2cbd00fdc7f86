"""The scoring MLP of a request alone — cuBLAS (cat, three fp32 Linear, two ReLU: ``model.ctr.mlp_head``) vs the
two Triton kernels (``cachestore/decode/fused_mlp.mlp_logits``) — each captured in a CUDA graph, at serving sizes.

    python benchmarks/mlp_head.py [--rows 1,64,512] [--parts 256,64] [--hidden 200,80] [--repeats 300]
                                  [--out benchmarks/results/mlp_head/mlp_head.json]

Median replay µs (CUDA events, after warm-up, the two ways alternated in 8 rounds) and the largest |logit
difference|. ``--parts 256,256,64`` is the zoo's head (short | long | target). GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import machine, timed  # noqa: E402
from collectivekv.cachestore.decode.fused_mlp import mlp_logits  # noqa: E402
from collectivekv.model.ctr import build_mlp, mlp_head  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "mlp_head" / "mlp_head.json"


def graphed(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` captured in one graph after three eager runs on a side stream (compiles, cuBLAS
    workspaces)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64,512")
    p.add_argument("--parts", default="256,64", help="widths of the input parts (din: attention 256 | target 64)")
    p.add_argument("--hidden", default="200,80")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mlp_head.py times the GPU head: run it on a CUDA machine")
    dev = torch.device("cuda")
    widths = [int(x) for x in args.parts.split(",")]
    hidden = tuple(int(x) for x in args.hidden.split(","))
    torch.manual_seed(0)
    mlp = build_mlp(sum(widths), hidden, 0.0).eval().to(dev)
    result = {"benchmark": "mlp_head", "machine": machine(dev), "command": " ".join(["mlp_head.py", *sys.argv[1:]]),
              "parts": widths, "hidden": list(hidden), "rows": {}}
    with torch.inference_mode():
        for r in (int(x) for x in args.rows.split(",")):
            parts = [torch.randn(r, 1, w, device=dev) for w in widths]
            ways = {"cublas": lambda parts=parts: mlp_head(mlp, parts),
                    "triton": lambda parts=parts: mlp_logits(mlp, parts)}
            diff = float((ways["triton"]() - ways["cublas"]()).abs().max())
            graphs = {k: graphed(fn) for k, fn in ways.items()}
            samples: dict[str, list[float]] = {k: [] for k in graphs}
            for _ in range(8):
                for k, g in graphs.items():
                    samples[k].append(timed(g.replay, dev, 5, max(1, args.repeats // 8))["median_ms"] * 1e3)
            row = {k: round(statistics.median(v), 2) for k, v in samples.items()}
            result["rows"][str(r)] = {"median_us": row, "max_abs_diff": diff}
            print(f"rows={r}: cuBLAS {row['cublas']} µs, Triton {row['triton']} µs, max |diff| {diff:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
