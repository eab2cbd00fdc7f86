"""SDIM's bucket-sum launch settings at the paper shape: a request's time per (col_split, block_l, warps).

GPU only (torch + numpy; no lmdb; about a minute):

    python benchmarks/long_stage_launch.py [--dtype float16] [--batch 512]
        → benchmarks/results/zoo_latency/long_stage_launch_<dtype>.json (and a table on stdout)

The shapes and the records are :mod:`benchmarks.zoo_latency`'s (paper shape, SDIM with full histories of L 1,000).
Per setting, one :class:`cachestore.decode.graphs.GraphedDecoder` (the serving graph: the batch's copy and the
decode, :func:`cachestore.decode.fused_long.bucket_sums` launched with that setting) serves the same pinned batch:
median CUDA-event time of ``run`` after warm-up, the settings timed round-robin so that drift of the machine
spreads over all of them. Every setting's logits (its first replay's and its last's) are checked against
``model.decode`` of the cache the batch holds.
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

from benchmarks.timing import machine  # noqa: E402
from benchmarks.zoo_batches import packed_cache, paper_batch  # noqa: E402
from benchmarks.zoo_synthetic import reference_logits  # noqa: E402
from collectivekv.cachestore.decode import fused_zoo_long  # noqa: E402
from collectivekv.cachestore.decode.decode import ResidentZooModel  # noqa: E402
from collectivekv.cachestore.decode.fused_long import bucket_sums  # noqa: E402
from collectivekv.cachestore.decode.graphs import GraphedDecoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_latency"
SETTINGS = [(2, 64, 2), (1, 16, 2), (2, 32, 2), (1, 64, 2), (2, 128, 2), (4, 64, 2), (2, 64, 4)]  # split, block, warps


def decoders(b: int, kv_dtype: str, device: torch.device) -> tuple[list, object, torch.Tensor, torch.Tensor]:
    """One GraphedDecoder per setting of :data:`SETTINGS` (each captured with its launch), the pinned batch of ``b``
    users, the candidates and ``model.decode``'s logits of the cache the batch holds."""
    cfg, model, layout, host, cand = paper_batch("sdim", b, kv_dtype, device)
    want = reference_logits(model, packed_cache(host, model, device), cand.to(device))
    resident = ResidentZooModel(model, device)
    graphs = []
    for split, block, warps in SETTINGS:
        fused_zoo_long.bucket_sums = functools.partial(bucket_sums, col_split=split, block_l=block, num_warps=warps)
        graph = GraphedDecoder(resident, layout, n_users=b, pad_to=cfg.window_len, n_candidates=1)
        graph.run(host, cand)  # captured here, with this setting
        graphs.append(graph)
    fused_zoo_long.bucket_sums = bucket_sums
    return graphs, host, cand, want


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    with torch.inference_mode():
        graphs, host, cand, want = decoders(args.batch, args.dtype, device)
        first = [graph.run(host, cand).clone() for graph in graphs]
        times: list[list[float]] = [[] for _ in graphs]
        for _ in range(args.repeats):
            for i, graph in enumerate(graphs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.run(host)
                end.record()
                end.synchronize()
                times[i].append(start.elapsed_time(end))
    rows = []
    for (split, block, warps), graph, ts, one in zip(SETTINGS, graphs, times, first, strict=True):
        diff = max(float((graph.logits - want).abs().max()), float((one - want).abs().max()))
        rows.append({"col_split": split, "block_l": block, "num_warps": warps,
                     "median_ms": round(statistics.median(ts), 4), "max_abs_diff_vs_model": diff})
        print(f"col_split {split} block_l {block:3d} warps {warps}: {statistics.median(ts):.4f} ms "
              f"(logits within {diff:.1e} of model.decode's)", flush=True)
    out = args.out or RESULTS / f"long_stage_launch_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(device), "arch": "sdim",
                               "B": args.batch, "L": 1000, "dtype": args.dtype, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
