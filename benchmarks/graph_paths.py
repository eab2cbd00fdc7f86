"""The CUDA-graph paths of ``decode_latency.py``'s (c) at one (B, L): c_graph, one replay of a graph holding
the batch copy and the decode (:func:`bench_graph`, with where its time goes: :func:`graph_phases`);
c_graph_mapped, a graph whose fused kernel reads the pinned batch itself (:func:`bench_mapped_graph`);
and the round-robin comparisons of copy pieces and launch settings inside the graph
(:func:`compare_overlap`, :func:`compare_launch`). Every path's scores are checked against c_poolscore's
(:func:`score_check`); the fused kernel's settings come from launch settings as --fused-launch writes them
(:func:`fused_config`).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.timing import timed
from collectivekv.cachestore.decode.decode import ResidentModel
from collectivekv.cachestore.decode.fused import FusedConfig
from collectivekv.cachestore.decode.graphs import GraphedDecoder, static_decode
from collectivekv.cachestore.store.entry import EntryLayout


def score_check(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> tuple[float, str | None]:
    """Max abs difference of a path's logits from c_poolscore's and, beyond ``tol`` (1e-4; wider for the
    fused paths with half-precision pools, --pool-dtype), the error to record instead of its timing."""
    diff = float((got - want).abs().max())
    ok = torch.allclose(got, want, rtol=tol, atol=tol)
    return diff, None if ok else f"scores differ from c_poolscore (max abs diff {diff:.3g})"


def fused_config(pool_dtype: str, launch: str) -> FusedConfig:
    """FusedConfig from integer launch settings "name=value,name=value" (as --fused-launch) and a pool dtype."""
    settings = {k: int(v) for k, v in (kv.split("=") for kv in launch.split(",") if kv)}
    return FusedConfig(pool_dtype=pool_dtype, **settings)


def bench_graph(row: dict, resident: ResidentModel, layout: EntryLayout, host, targets: torch.Tensor,
                want: torch.Tensor, args: argparse.Namespace, device: torch.device) -> None:
    """c_graph: copy into a captured graph's static buffer + replay (GPU); scores checked against
    ``want`` (c_poolscore's). On CPU the same static path runs eagerly for the check; nothing is timed."""
    b, length = targets.shape[0], row["L"]
    try:
        graph = GraphedDecoder(resident, layout, n_users=b, pad_to=length, n_candidates=targets.shape[1],
                               path=args.graph_path, eager=device.type != "cuda", fused=args.fused,
                               overlap=args.overlap)
        row["c_graph_path"] = graph.path
        row["c_graph_copy_pieces"] = len(graph.pieces(graph.copy_bytes(host)))
        tol = args.score_tol if graph.path == "fused" else 1e-4
        row["c_graph_max_abs_diff"], error = score_check(graph.run(host, targets), want, tol)
        row["c_graph_scores_match"] = error is None
        if error:
            row["c_graph"] = {"error": error}
            print(f"L={length} B={b}: c_graph MISMATCH: {row['c_graph']['error']}", flush=True)
        elif device.type != "cuda":
            row["c_graph"] = {"skipped": "CUDA graphs need a GPU (scores of the eager static path checked)"}
        else:
            row["c_graph"] = timed(lambda: graph.run(host), device, args.warmup, args.repeats)
            phases = graph_phases(graph, host, args.repeats)
            copy_ms = phases["copy_ms"]
            row["c_breakdown"]["graph_copy"] = {"median_ms": copy_ms, "bytes": graph.copy_bytes(host)}
            row["c_breakdown"]["graph_phases"] = phases
            if row["c_graph_copy_pieces"] == 1:  # overlapped copies run beside the decode: no difference to take
                row["c_breakdown"]["graph_decode"] = {"median_ms": row["c_graph"]["median_ms"] - copy_ms}
            if graph.path == "fused":
                bench_mapped_graph(row, graph, host, want, args, device)
                if args.compare_overlap:
                    compare_overlap(row, graph, host, targets, want, args, device)
                if args.compare_launch:
                    compare_launch(row, graph, host, targets, want, args, device)
    except Exception as exc:  # a capture failure must not lose the other numbers
        row["c_graph"] = {"error": repr(exc)[:500]}
        print(f"L={length} B={b}: c_graph failed: {row['c_graph']['error']}", flush=True)


def graph_phases(graph: GraphedDecoder, host, repeats: int) -> dict:
    """Where a c_graph replay's time goes, from CUDA events around ``graph.run(host)`` and the graph's own
    copy events (medians over ``repeats`` replays): launch_ms, event before run() → the graph's batch copy
    starts (run()'s host work and the graph launch, as the GPU sees it); copy_ms, the batch copy (all its
    pieces); after_copy_ms, the copy's end → the event after run() (the decode the copy did not hide)."""
    launch, copy, after = [], [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.run(host)
        end.record()
        end.synchronize()
        copy_start, copy_end = graph.last_cost.events
        launch.append(start.elapsed_time(copy_start))
        copy.append(copy_start.elapsed_time(copy_end))
        after.append(copy_end.elapsed_time(end))
    return {"launch_ms": statistics.median(launch), "copy_ms": statistics.median(copy),
            "after_copy_ms": statistics.median(after), "n": repeats}


def bench_mapped_graph(row: dict, graph: GraphedDecoder, host, want: torch.Tensor, args: argparse.Namespace,
                       device: torch.device) -> None:
    """c_graph_mapped (experiment, CUDA): a graph whose fused kernel reads the pinned host batch itself
    (mapped, zero-copy: the PCIe transfer overlaps the attention; no copy launched at all). The replay is
    the whole path from pinned memory to logits. Scores checked against c_poolscore; failures recorded."""
    def body() -> torch.Tensor:  # the decode over the pinned host batch itself
        return static_decode(host.tensor, graph.candidates, resident=graph.resident, layout=graph.layout,
                             n_users=graph.n_users, pad_to=graph.pad_to, path=graph.path, fused=graph.fused)
    try:
        mapped = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles for the new pointer kind)
            body()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(mapped):
            logits = body()
        mapped.replay()
        _, error = score_check(logits, want, args.score_tol)
        row["c_graph_mapped"] = {"error": error} if error else timed(mapped.replay, device, args.warmup, args.repeats)
    except Exception as exc:
        row["c_graph_mapped"] = {"error": repr(exc)[:500]}
        print(f"L={row['L']} B={row['B']}: c_graph_mapped failed: {row['c_graph_mapped']['error']}", flush=True)


def compare_overlap(row: dict, graph: GraphedDecoder, host, targets: torch.Tensor, want: torch.Tensor,
                    args: argparse.Namespace, device: torch.device) -> None:
    """graph_overlap_compare (CUDA): the c_graph replay with the batch copy in K pieces beside the decode
    (GraphedDecoder overlap=K) for each K of --compare-overlap ("Ks": the piece launches one after
    another), timed round-robin (:func:`round_robin`); scores checked."""
    variants = {}
    for k in dict.fromkeys(x.strip() for x in args.compare_overlap.split(",")):
        overlap, concurrent = int(k.rstrip("s")), not k.endswith("s")
        variants[k] = {"overlap": overlap, "concurrent": concurrent}
    row["graph_overlap_compare"] = round_robin(graph, variants, host, targets, want, args, device)
    print(f"L={row['L']} B={row['B']} overlap " + "  ".join(
        f"K={k}: {v['median_ms']:.4f} ms" for k, v in row["graph_overlap_compare"].items()), flush=True)


def compare_launch(row: dict, graph: GraphedDecoder, host, targets: torch.Tensor, want: torch.Tensor,
                   args: argparse.Namespace, device: torch.device) -> None:
    """graph_launch_compare (CUDA): the c_graph replay with each FusedConfig launch setting of
    --compare-launch (";"-separated, e.g. "block_l=32,num_warps=1;block_l=16,split_l=4"; the pool dtype
    of --pool-dtype), timed round-robin (:func:`round_robin`) — the kernel tuned where it serves, inside
    the graph, where no launch overhead hides its time; scores checked."""
    variants = {}
    for spec in dict.fromkeys(x.strip() for x in args.compare_launch.split(";")):
        variants[spec or "default"] = {"fused": fused_config(args.pool_dtype, spec)}
    row["graph_launch_compare"] = round_robin(graph, variants, host, targets, want, args, device)
    ranked = sorted(row["graph_launch_compare"].items(), key=lambda kv: kv[1]["median_ms"])
    print(f"L={row['L']} B={row['B']} launch settings, fastest first: " + "  ".join(
        f"[{k}] {v['median_ms']:.4f}" for k, v in ranked), flush=True)


def round_robin(graph: GraphedDecoder, variants: dict[str, dict], host, targets: torch.Tensor, want: torch.Tensor,
                args: argparse.Namespace, device: torch.device, rounds: int = 8) -> dict:
    """Median replay ms of a GraphedDecoder per variant (keyword overrides of c_graph's decoder:
    overlap, concurrent, fused), each checked against ``want`` first, then timed in ``rounds`` rounds of
    repeats / rounds replays each, so drift of the machine hits every variant alike."""
    base = {"overlap": graph.overlap, "concurrent": graph.concurrent, "fused": graph.fused}
    graphs = {}
    for key, change in variants.items():
        kw = {**base, **change}
        g = graph if kw == base else GraphedDecoder(  # c_graph's own decoder where nothing changes (checked above)
            graph.resident, graph.layout, n_users=graph.n_users, pad_to=graph.pad_to,
            n_candidates=graph.n_candidates, path="fused", **kw)
        _, error = score_check(g.run(host, targets), want, args.score_tol)
        if error:
            raise AssertionError(f"{key}: {error}")
        graphs[key] = g
    samples: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(rounds):
        for k, g in graphs.items():
            t = timed(lambda g=g: g.run(host), device, 2, max(1, args.repeats // rounds))
            samples[k].append(t["median_ms"])
    return {k: {"pieces": len(g.pieces(g.copy_bytes(host))), "median_ms": statistics.median(samples[k]),
                "round_medians_ms": samples[k]} for k, g in graphs.items()}
