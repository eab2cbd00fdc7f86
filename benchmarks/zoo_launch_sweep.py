"""Launch settings of the zoo kernels that bound TWIN's and HSTU's requests, swept on the GPU.

GPU only (torch + numpy; no lmdb; a few minutes):

    python benchmarks/zoo_launch_sweep.py [--parts scores,route,history] [--dtype float16]
        → benchmarks/results/zoo_latency/zoo_launch_sweep_<dtype>.json (and the fastest settings on stdout)

The shapes and records are :mod:`benchmarks.zoo_latency`'s (paper shape, B 512, L 1,000, one candidate).

    scores   TWIN's ``group_scores`` over the whole batch (already on the device) for heads per program ×
             warps × blocks of rows per program, each summed as one tile or head by head (``head_loop``), each
             setting's scores checked bit-equal to the first's (one head, one warp, one block a program)
    route    the HSTU second layer's router (10,000 × E) over 512 layer-normalised rows (``route_rows``) for
             columns per tensor-core step × programs aimed at × warps, each checked equal to the torch argmax
    history  HSTU's whole serving graph (``GraphedDecoder``, copy included; the one-buffer batch) per ``FusedConfig``
             of its history kernel (heads per program × warps × block of behaviours), round-robin, logits checked
             against the first

Kernel settings are timed as 20 calls captured in one CUDA graph (the median over 30 replays, per call); graphs as
``benchmarks/zoo_overlap.py`` times them. The chosen settings live in ``cachestore.decode.fused_zoo_long``
(``SCORES_LAUNCH``), ``cachestore.decode.fused_route`` (``SCAN_BN``, ``TARGET_PROGRAMS``, ``SCAN_WARPS``) and
``cachestore.decode.fused_config.FusedConfig``'s defaults (HSTU's history kernel).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mlp_head import graphed  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from benchmarks.zoo_batches import paper_batch  # noqa: E402
from benchmarks.zoo_overlap import round_robin  # noqa: E402
from collectivekv.cachestore.decode import fused_long, fused_route, fused_zoo_long  # noqa: E402
from collectivekv.cachestore.decode.decode import ResidentZooModel  # noqa: E402
from collectivekv.cachestore.decode.fused import FUSED, FusedConfig  # noqa: E402
from collectivekv.cachestore.decode.fused_hstu_candidate import layer_routers  # noqa: E402
from collectivekv.cachestore.decode.graphs import GraphedDecoder, static_decode  # noqa: E402
from collectivekv.model.routing import route  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_latency"


def graph_us(fn: Callable[[], object], calls: int = 20, replays: int = 30) -> float:
    """Median µs of one call of ``fn``, ``calls`` of them captured in one CUDA graph (:func:`mlp_head.graphed`)."""
    graph = graphed(fn, calls)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def scores_sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """TWIN's score launch per (heads per program, warps, blocks per program), on the arguments the decode passes."""
    cfg, model, layout, host, cand = paper_batch("twin", args.batch, args.dtype, device)
    resident = ResidentZooModel(model, device)
    seen: dict = {}
    chosen = fused_zoo_long.group_scores

    def spy(*a: object, **kw: object) -> torch.Tensor:
        seen["call"] = (a, kw)
        return chosen(*a, **kw)

    fused_zoo_long.group_scores = spy
    try:
        flags = torch.zeros(args.batch, dtype=torch.int32, device=device)
        static_decode(host.tensor.to(device), cand.to(device), resident=resident, layout=layout, n_users=args.batch,
                      pad_to=layout.max_len, path=FUSED, flags=flags)
    finally:
        fused_zoo_long.group_scores = chosen
    a, kw = seen["call"]
    rows, first = [], None
    for loop, gh, warps, blocks in itertools.product([False, True], [1, 2, 4, 8], [1, 2, 4, 8], [1, 2, 4]):
        if loop and gh == 1:
            continue  # one head a program is summed head by head already
        launch = dict(kw, heads_per_program=gh, num_warps=warps, blocks_per_program=blocks, head_loop=loop)
        got = fused_long.group_scores(*a, **launch).clone()
        first = got if first is None else first
        rows.append({"heads_per_program": gh, "num_warps": warps, "blocks_per_program": blocks, "head_loop": loop,
                     "us": round(graph_us(lambda launch=launch: fused_long.group_scores(*a, **launch)), 2),
                     "equal": bool(torch.equal(got, first))})
    return rows


def route_sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The HSTU second layer's router scan per (columns a step, programs aimed at, warps)."""
    cfg, model, *_ = paper_batch("hstu", 8, args.dtype, device, split=False)
    weight, bound = layer_routers(ResidentZooModel(model, device))[1].routers[0]
    e = weight.shape[1]
    x = torch.nn.functional.layer_norm(torch.randn(args.batch, e, device=device,
                                                   generator=torch.Generator(device).manual_seed(0)), (e,))
    want = route(torch.nn.functional.linear(x, weight)).idx
    saved = fused_route.SCAN_BN, fused_route.TARGET_PROGRAMS, fused_route.SCAN_WARPS
    rows = []
    try:
        for bn, programs, warps in itertools.product([32, 64, 128], [132, 264, 528], [4, 8]):
            fused_route.SCAN_BN, fused_route.TARGET_PROGRAMS, fused_route.SCAN_WARPS = bn, programs, warps
            bm, bn_, spans, _ = fused_route.scan_shape(args.batch, weight.shape[0], e)
            rows.append({"scan_bn": bn, "target_programs": programs, "scan_warps": warps, "bm": bm, "bn": bn_,
                         "programs": spans * -(-args.batch // bm),
                         "equal": bool(torch.equal(fused_route.route_rows(x, weight, bound), want)),
                         "us": round(graph_us(lambda: fused_route.route_rows(x, weight, bound)), 2)})
    finally:
        fused_route.SCAN_BN, fused_route.TARGET_PROGRAMS, fused_route.SCAN_WARPS = saved
    return rows


def history_sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """HSTU's serving graph per FusedConfig of its history kernel, timed round-robin."""
    cfg, model, layout, host, cand = paper_batch("hstu", args.batch, args.dtype, device, split=False)
    resident = ResidentZooModel(model, device)
    configs, graphs, logits = [], [], []
    for gh, w, bl in itertools.product([1, 2, 4, 8], [1, 2, 4], [16]):
        config = FusedConfig(heads_per_program=gh, num_warps=w, block_l=bl)
        graph = GraphedDecoder(resident, layout, n_users=args.batch, pad_to=cfg.window_len, n_candidates=1,
                               fused=config)
        try:
            logits.append(graph.run(host, cand).clone())
        except Exception as error:  # noqa: BLE001 — a setting the GPU cannot launch (shared memory, registers)
            print(f"history {config}: {type(error).__name__} {str(error)[:80]}", flush=True)
            continue
        configs.append(config)
        graphs.append(graph)
    rounds = round_robin(graphs, host, device, args.rounds, 20, warmup=3)
    return [{"heads_per_program": f.heads_per_program, "num_warps": f.num_warps, "block_l": f.block_l,
             "ms": round(statistics.median(ms), 4), "max_abs_diff": float((out - logits[0]).abs().max())}
            for f, ms, out in zip(configs, rounds, logits, strict=True)]


SWEEPS = {"scores": (scores_sweep, "us"), "route": (route_sweep, "us"), "history": (history_sweep, "ms")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="scores,route,history")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    doc = {"benchmark": "zoo_launch_sweep", "command": "zoo_launch_sweep.py " + " ".join(sys.argv[1:]),
           "machine": machine(device), "batch": args.batch, "L": 1000, "dtype": args.dtype}
    with torch.inference_mode():
        for part in args.parts.split(","):
            sweep, unit = SWEEPS[part]
            rows = sorted(sweep(args, device), key=lambda r: r[unit])
            doc[part] = rows
            for row in rows[:5]:
                print(part, json.dumps(row), flush=True)
    out = args.out or RESULTS / f"zoo_launch_sweep_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
