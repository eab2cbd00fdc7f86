"""SDIM's bucket-sum launch settings at the paper shape: the decode's GPU time per (col_split, block_l, warps).

GPU only (torch + numpy; no lmdb; about a minute):

    python benchmarks/long_stage_launch.py [--dtype float16] [--batch 512]
        → benchmarks/results/zoo_latency/long_stage_launch_<dtype>.json (and a table on stdout)

The shapes and the records are :mod:`benchmarks.zoo_latency`'s (paper shape, SDIM with full histories of L 1,000).
The packed batch is copied to the device once; per setting, the decode body the serving graphs capture
(:func:`cachestore.decode.graphs.static_decode`, path "fused", :func:`cachestore.decode.fused_long.bucket_sums`
launched with that setting) is captured in a CUDA graph and replayed: median CUDA-event time after warm-up, the
settings timed round-robin so that drift of the machine spreads over all of them. Every setting's logits (its first
replay's and its last's) are checked against the eager decode's with the default launch.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_latency import machine  # noqa: E402
from benchmarks.zoo_latency import store_layout, store_records  # noqa: E402
from benchmarks.zoo_synthetic import N_ITEMS, PAPER, make_models, model_config  # noqa: E402
from collectivekv.cachestore.decode import fused_zoo  # noqa: E402
from collectivekv.cachestore.decode.batch import HostBatcher  # noqa: E402
from collectivekv.cachestore.decode.decode import ResidentZooModel  # noqa: E402
from collectivekv.cachestore.decode.fused import FUSED  # noqa: E402
from collectivekv.cachestore.decode.fused_long import bucket_sums  # noqa: E402
from collectivekv.cachestore.decode.graphs import static_decode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_latency"
SETTINGS = [(2, 64, 2), (1, 16, 2), (2, 32, 2), (1, 64, 2), (2, 128, 2), (4, 64, 2), (2, 64, 4)]  # split, block, warps


def graphs(b: int, kv_dtype: str, device: torch.device) -> tuple[list, torch.Tensor]:
    """One captured decode per setting of :data:`SETTINGS` over one packed SDIM batch of ``b`` users, and the eager
    decode's logits with the default launch."""
    cfg = model_config("sdim", 1000, PAPER, N_ITEMS)
    model = make_models(cfg, seed=0)[0].to(device)
    layout = store_layout(cfg, kv_dtype)
    host = HostBatcher(layout, pin=True).pack(list(range(b)), store_records(model, layout, b, kv_dtype, device))
    raw = host.tensor.to(device)
    resident = ResidentZooModel(model, device)
    cand = torch.randint(1, cfg.n_items + 1, (b, 1), device=device)
    flags = torch.zeros(b, dtype=torch.int32, device=device)
    want = static_decode(raw, cand, resident=resident, layout=layout, n_users=b, pad_to=layout.max_len, path=FUSED,
                         flags=flags).clone()  # eager, the default launch
    captured = []
    for split, block, warps in SETTINGS:
        fused_zoo.bucket_sums = functools.partial(bucket_sums, col_split=split, block_l=block, num_warps=warps)

        def body() -> torch.Tensor:
            return static_decode(raw, cand, resident=resident, layout=layout, n_users=b, pad_to=layout.max_len,
                                 path=FUSED, flags=flags)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compiles and warms up outside the capture
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = body()
        captured.append((graph, logits))
    fused_zoo.bucket_sums = bucket_sums
    return captured, want


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    with torch.inference_mode():
        captured, want = graphs(args.batch, args.dtype, device)
        times: list[list[float]] = [[] for _ in captured]
        first = []
        for graph, logits in captured:
            graph.replay()
            first.append(logits.clone())
        for _ in range(args.repeats):
            for i, (graph, _) in enumerate(captured):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times[i].append(start.elapsed_time(end))
    rows = []
    for (split, block, warps), (_, logits), ts, one in zip(SETTINGS, captured, times, first, strict=True):
        diff = max(float((logits - want).abs().max()), float((one - want).abs().max()))
        rows.append({"col_split": split, "block_l": block, "num_warps": warps,
                     "median_ms": round(statistics.median(ts), 4), "max_abs_diff_vs_eager": diff})
        print(f"col_split {split} block_l {block:3d} warps {warps}: {statistics.median(ts):.4f} ms "
              f"(logits within {diff:.1e} of the eager decode's)", flush=True)
    out = args.out or RESULTS / f"long_stage_launch_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(device), "arch": "sdim",
                               "B": args.batch, "L": 1000, "dtype": args.dtype, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
