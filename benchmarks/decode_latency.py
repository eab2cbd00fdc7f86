"""Decode latency at the paper's scale (Table 2): full-KV cache vs CollectiveKV, host memory → scores.

GPU (needs only torch + numpy; matplotlib for the plot; no lmdb):

    python benchmarks/decode_latency.py                       # -> benchmarks/results/decode_latency.{json,png}

CPU dry run (proves the script end to end; numbers are NOT the GPU result):

    python benchmarks/decode_latency.py --device cpu --quick  # -> results/decode_latency/decode_latency_cpu_dryrun.json

Model: TargetAttentionCTR, embed 64, d_a 256, 8 heads, d_u 1, pool 10,000, fp32, random weights (latency
does not depend on training). Every user has a full history of L behaviours; one candidate per user.
Precision: --store-dtype (float16, the store's default, or float32) is the precision of BOTH caches — the
full K/V of (a)/(b) and the user parts of (c) — and, by default, of the pool rows the fused paths read
(FusedConfig's default: the store's kv dtype); so each run compares like with like.
Paths, each timed end to end from host memory to logits on the device (median of CUDA-event timings
after warm-up; perf_counter on CPU):

  (a) full KV, pinned host memory: K and V (B, L, d_a) at the store dtype in ONE contiguous pinned
      tensor, one copy, then target attention + MLP (the strong baseline);
  (b) the same from pageable memory (the paper's baseline);
  (c) CollectiveKV: the packed batch (user parts at the store dtype + uint16 router indices, the store's records,
      cachestore/decode/batch.py) in pinned memory → one copy (cachestore.decode.transfer.to_device) → unpack →
      decode (cachestore.decode.decode.decode), for each attention path (poolscore, gather[, compiled]);
      c_fused: one copy → the fused Triton kernel over the packed records (cachestore.decode.fused; no unpack);
      c_graph: one replay of a CUDA graph holding the copy of the batch and the decode
      (cachestore.decode.graphs.GraphedDecoder, --graph-path, default auto = fused);
      c_graph_mapped (experiment): a graph whose fused kernel reads the pinned batch over PCIe (zero-copy);
      --pool-dtype overrides the pool rows' precision (fp16/bf16 rows: scores within 3e-3 of fp32 rows);
      its scores are checked against c_poolscore once per (B, L) (the CPU dry run checks the eager
      static path and times nothing; a mismatch is recorded and makes the script exit 1 at the end).

Also: pinned/pageable copy bandwidth and a small copy's fixed latency (the PCIe floor of (c):
bytes / pinned bandwidth + fixed latency), the breakdown of (c) (copy, unpack, decode), and the
LMDB → host-buffer fetch + pack time per batch size (cachestore.decode.batch.HostBatcher.fetch on one CPU
core; needs lmdb + pyarrow, skipped where they are missing).

Targets (issue): B = 512, L = 1000: (c) >= 50x faster than (a); (c) within 2x of its PCIe floor;
fetch + pack of 512 users <= 1 ms on one CPU core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode_paths import bench_length  # noqa: E402
from benchmarks.graph_paths import fused_config  # noqa: E402
from benchmarks.paper_store import N_ITEMS, PAPER, collective_layout, fetch_benchmark, paper_model  # noqa: E402
from benchmarks.timing import copy_limits, machine  # noqa: E402
from collectivekv.cachestore.decode.copy_plan import DEFAULT_OVERLAP  # noqa: E402
from collectivekv.cachestore.decode.decode import decode  # noqa: E402
from collectivekv.cachestore.decode.fused import pool_dtype  # noqa: E402
from collectivekv.cachestore.decode.transfer import KV_TORCH  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STORE_DTYPES = ("float16", "float32")  # --store-dtype: the caches' precision (both stores, one knob)


def parse_args() -> argparse.Namespace:
    """The command line (this module's docstring is its help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,8,32,64,128,256,512)")
    p.add_argument("--lengths", default=None, help="comma list (default 50,1000)")
    p.add_argument("--store-dtype", choices=STORE_DTYPES, default="float16",
                   help="precision of both caches: the full K/V of (a)/(b) and the user parts of (c) (and, unless "
                        "--pool-dtype says otherwise, of the pool rows the fused paths read)")
    p.add_argument("--full-kv-dtype", choices=STORE_DTYPES, default=None,
                   help="override the full K/V's precision only (default: --store-dtype)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(decode) on the poolscore path")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--pool-dtype", choices=["store", *sorted(KV_TORCH)], default="store",
                   help="pool rows the fused paths read (c_fused, c_graph; FusedConfig.pool_dtype; "
                        "store: the store dtype, FusedConfig's default)")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                   help="c_graph copies the batch in up to this many pieces beside the fused decode "
                        "(GraphedDecoder overlap; 1: one copy before the decode)")
    p.add_argument("--compare-overlap", default=None,
                   help="comma list of K: also time the graph with overlap=K for each, round-robin (experiment); "
                        "K followed by s: the piece launches one after another on one stream (concurrent=False)")
    p.add_argument("--compare-launch", default=None,
                   help="';'-separated FusedConfig launch settings (as --fused-launch; empty = the defaults): also "
                        "time the graph with each, round-robin (experiment: tuning inside the graph)")
    p.add_argument("--fused-launch", default="",
                   help="FusedConfig launch settings, e.g. block_l=64,heads_per_program=8,num_warps=2")
    p.add_argument("--graph-path", choices=["auto", "fused", "poolscore", "gather"], default="auto",
                   help="attention path captured in the c_graph CUDA graph (auto: fused on CUDA with Triton, "
                        "else choose_path for the shape)")
    p.add_argument("--no-fetch", action="store_true", help="skip the LMDB fetch benchmark")
    p.add_argument("--fetch-users", type=int, default=None,
                   help="users per LMDB store (default 100,000 at L <= 100, else 20,000: 46 / 164 MB, beyond the LLC)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --device cpu, for stable numbers; else torch's)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def configure(args: argparse.Namespace) -> tuple[torch.device, list[int], list[int], str, Path]:
    """Completes ``args`` (full_kv_dtype, fused, score_tol, warmup, repeats, repeats_full; exits where CUDA is
    asked for and missing): (device, batch sizes, lengths, the pool rows' dtype the fused paths read, output)."""
    args.full_kv_dtype = args.full_kv_dtype or args.store_dtype
    args.fused = fused_config(args.pool_dtype, args.fused_launch)
    pools = pool_dtype(args.fused, collective_layout(1, "0" * 16, args.store_dtype))  # what the fused paths read
    # half pools: their rounding (tests/cachestore/decode/test_fused.py)
    args.score_tol = 1e-4 if pools == "float32" else 3e-3
    device = torch.device(args.device)
    dry = device.type != "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for a dry run")
    quick_sizes = [1, 8, 64] if dry else [1, 8, 64, 512]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else (
        quick_sizes if args.quick else [1, 8, 32, 64, 128, 256, 512])
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [50, 1000]
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 30)
    args.repeats_full = max(3, args.repeats // 3) if dry else args.repeats
    out = args.out or RESULTS / "decode_latency" / ("decode_latency_cpu_dryrun.json" if dry else "decode_latency.json")
    return device, batch_sizes, lengths, pools, out


def run_sweep(args: argparse.Namespace, device: torch.device, batch_sizes: list[int],
              lengths: list[int]) -> tuple[dict, dict, list[dict]]:
    """The machine and the copy limits (both printed), then the paths at every (B, L) (one row each, printed):
    (machine, copy limits, rows). Torch runs on 1 CPU thread in a dry run unless --threads says otherwise."""
    dry, pin = device.type != "cuda", device.type == "cuda"
    if args.threads or dry:
        torch.set_num_threads(args.threads or 1)
    torch.set_grad_enabled(False)
    info = machine(device)
    info["torch_threads"] = torch.get_num_threads()
    print(json.dumps(info))
    limits = copy_limits(device, pin, args.quick, args.warmup, args.repeats)
    print(f"copy: floor {limits['floor_gb_per_s']:.2f} GB/s + {limits['floor_fixed_ms'] * 1e3:.1f} us fixed")
    resident = paper_model(max(lengths), device)
    compiled = torch.compile(decode, mode=args.compile_mode) if args.compile else None
    rows = []
    with torch.inference_mode():
        for length in lengths:
            rows += bench_length(resident, length, batch_sizes, args, device, pin, limits, compiled)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return info, limits, rows


def targets_of(rows: list[dict], fetch: dict, lengths: list[int]) -> dict:
    """The targets (module docstring) at B 512, L 1000 where that row was run, (c)'s and c_graph's ratio to
    the floor at every (B, L), whether c_graph's scores matched everywhere, and the fetch of 512 users."""
    key = [r for r in rows if r["B"] == 512 and r["L"] == 1000]
    targets: dict = {}
    if key:
        r = key[0]
        targets["speedup_a_over_c_B512_L1000"] = r["speedup_vs_a"]
        targets["speedup_50x_met"] = None if r["speedup_vs_a"] is None else r["speedup_vs_a"] >= 50
        targets["c_over_floor_B512_L1000"] = r["c_over_floor"]
        targets["c_within_2x_floor_met"] = r["c_over_floor"] <= 2
        targets["c_best_B512_L1000"] = r["c_best"]
        targets["graph_speedup_a_over_c_B512_L1000"] = r["c_graph_speedup_vs_a"]
        targets["graph_c_over_floor_B512_L1000"] = r["c_graph_over_floor"]
        mapped_ms = r.get("c_graph_mapped", {}).get("median_ms")
        targets["graph_mapped_over_floor_B512_L1000"] = mapped_ms / r["floor_ms"] if mapped_ms else None
    targets["c_within_2x_floor_all"] = {f"L{r['L']}_B{r['B']}": round(r["c_over_floor"], 2) for r in rows}
    targets["c_graph_over_floor_all"] = {f"L{r['L']}_B{r['B']}": None if r["c_graph_over_floor"] is None
                                         else round(r["c_graph_over_floor"], 2) for r in rows}
    targets["c_graph_scores_match_all"] = all(r.get("c_graph_scores_match") for r in rows)
    for length in lengths:
        f = fetch.get(str(length), {}).get("512")
        if f:
            targets[f"fetch_pack_512_L{length}_ms"] = f["median_ms"]
            targets[f"fetch_pack_512_L{length}_le_1ms"] = f["median_ms"] <= 1.0
        z = fetch.get(str(length), {}).get("zero_copy", {}).get("512")
        if z:
            targets[f"fetch_zero_copy_512_L{length}_ms"] = z["median_ms"]
            targets[f"fetch_zero_copy_512_L{length}_le_1ms"] = z["median_ms"] <= 1.0
    return targets


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    lengths = sorted({r["L"] for r in result["rows"]})
    has_fetch = any(k.isdigit() for k in result.get("fetch", {}))
    fig, axes = plt.subplots(1, len(lengths) + int(has_fetch), figsize=(5.5 * (len(lengths) + has_fetch), 4.2))
    axes = np.atleast_1d(axes)
    series = [("a_full_pinned", "(a) full KV, pinned", "C0", "-"),
              ("b_full_pageable", "(b) full KV, pageable", "C1", "-"),
              ("c_poolscore", "(c) CollectiveKV, poolscore", "C2", "-"),
              ("c_gather", "(c) CollectiveKV, gather", "C3", "--"),
              ("c_poolscore_compiled", "(c) poolscore, compiled", "C4", ":"),
              ("c_fused", "(c) fused kernel, eager", "C6", "--"),
              ("c_graph", "(c) fused kernel, CUDA graph", "C5", "-"),
              ("c_graph_mapped", "(c) graph reading pinned memory (zero-copy)", "C9", "-.")]
    for ax, length in zip(axes, lengths, strict=False):
        rows = [r for r in result["rows"] if r["L"] == length]
        bs = [r["B"] for r in rows]
        for key, label, color, style in series:
            ys = [r.get(key, {}).get("median_ms") if isinstance(r.get(key), dict) else None for r in rows]
            if any(y is not None for y in ys):
                ax.plot(bs, [np.nan if y is None else y for y in ys], style, marker="o", color=color, label=label)
        floor_label = "copy floor of (c)" if result["dry_run"] else "PCIe floor of (c)"
        ax.plot(bs, [r["floor_ms"] for r in rows], "k:", label=floor_label)
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="ms (median)", title=f"L = {length}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if has_fetch:
        ax = axes[-1]
        for k, v in result["fetch"].items():
            if k.isdigit():
                bs = sorted(int(b) for b in v if b.isdigit())
                line, = ax.plot(bs, [v[str(b)]["median_ms"] for b in bs], marker="o", label=f"L = {k} (copy)")
                z = v.get("zero_copy", {})
                if z:
                    ax.plot(bs, [z[str(b)]["median_ms"] for b in bs], marker="s", ls="--", color=line.get_color(),
                            label=f"L = {k} (zero-copy: lookups + gather table)")
        ax.axhline(1.0, color="k", ls=":", label="1 ms target (512 users)")
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="ms (median)",
               title="LMDB fetch + pack, one CPU core")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    dev = result["machine"].get("gpu") or result["machine"].get("cpu", "cpu")
    fig.suptitle(("CPU DRY RUN (not the GPU result) — " if result["dry_run"] else "") + f"decode latency on {dev}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    args = parse_args()
    device, batch_sizes, lengths, pools, out = configure(args)
    dry, pin = device.type != "cuda", device.type == "cuda"
    info, limits, rows = run_sweep(args, device, batch_sizes, lengths)
    fetch = {"skipped": "--no-fetch"} if args.no_fetch else fetch_benchmark(
        lengths, [1, 8, 32, 64, 128, 256, 512],
        {L: args.fetch_users or (100_000 if L <= 100 else 20_000) for L in lengths}, 200, pin, args.store_dtype)
    targets = targets_of(rows, fetch, lengths)
    result = {"benchmark": "decode_latency", "dry_run": dry,
              "note": ("CPU DRY RUN: proves the benchmark runs end to end; the latencies are not the GPU result"
                       if dry else "H2D + decode on the GPU; fetch on one CPU core"),
              "machine": info, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "config": {**PAPER, "n_items": N_ITEMS, "model_dtype": "float32", "store_dtype": args.store_dtype,
                         "full_kv_dtype": args.full_kv_dtype, "pool_dtype": pools,
                         "collective_record": f"{args.store_dtype} user parts + uint16 indices",
                         "candidates_per_user": 1,
                         "batch_sizes": batch_sizes, "lengths": lengths, "warmup": args.warmup,
                         "repeats": args.repeats, "repeats_full": args.repeats_full, "compile": args.compile,
                         "graph_path": args.graph_path, "fused": dataclasses.asdict(args.fused),
                         "overlap": args.overlap},
              "copy_limits": limits, "rows": rows, "fetch": fetch, "targets": targets}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(targets, indent=2))
    plot(result, out.with_suffix(".png"))
    if not targets["c_graph_scores_match_all"]:
        sys.exit("c_graph: scores differ from c_poolscore or the graph failed (see c_graph in the rows)")


if __name__ == "__main__":
    main()
