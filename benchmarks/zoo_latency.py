"""Decode latency of every model of the zoo (din, SIM, ETA, SDIM, TWIN, HSTU): full KV vs CollectiveKV.

GPU (torch + numpy; matplotlib for the plot; no lmdb; < 8 minutes on an H200 for both dtypes):

    python benchmarks/zoo_latency.py            # -> benchmarks/results/zoo_latency/zoo_latency_<dtype>.json,
                                                #    zoo_latency.md, zoo_latency.png

One dtype per run (``--dtype float16``, then ``--dtype float32``) gives the same files: the table and
the plot cover every ``zoo_latency_<dtype>.json`` in the output folder.

CPU dry run (tiny shapes; proves the script end to end, numbers are NOT the GPU result; writes under the
temporary directory unless --out-dir says otherwise):

    python benchmarks/zoo_latency.py --device cpu --quick

Shapes (paper): embed 64, d_a 256, 8 heads, d_u 1, pool 10,000, topk 50, 18 genres (up to 3 per item: SIM's
category bitmasks), HSTU 2 layers, random weights, C candidates per user (default 1), every user a full
history: din and hstu L 50 and L 1000 (max_len); sim/eta/sdim/twin short 50 + long L 1000 (long_len).
B in 1, 64, 256, 512; the store dtype (--dtype) float16 and float32. Per (arch, L, dtype, B):

- **baseline** (the strongest full-KV path): every cached K/V group of the FULL model (kv_mode full) as
  padded (B, rows, d_a) tensors at the store dtype, the retrieval keys, the lengths and the candidates in
  ONE contiguous pinned host buffer; one copy, then the model's decode math at the store dtype (no cast of
  the K/V to fp32): target attention by ``scaled_dot_product_attention`` with a length mask (SIM/ETA over
  the gathered top-k rows), TWIN's per-head top-k + softmax of those scores, SDIM's bucket aggregation,
  HSTU's SiLU attention by einsum; copy + decode captured in a CUDA graph, the replay timed. Its logits
  are checked against ``model.decode`` of the same full cache (fp32 model; tolerance by dtype).
- **CollectiveKV**: the collective store's records (din: ``paper_store``'s layout and synthetic records;
  zoo: the model's ``cachestore.store.entry.entry_layout``, N(0, 1) user parts, uniform router indices, the
  model's retrieval keys of random items) packed as a serving runtime with graphs packs them (pinned;
  HSTU split by layer: ``cachestore.decode.layer_batch``) →
  ``GraphedDecoder(...).run`` (one replay: copy + decode; :func:`bench_collective`), checked against
  ``model.decode`` of the cache the packed batch holds (eager unpack). Where
  ``GraphedDecoder`` refuses the layout the row says so and carries the baseline only
  (``collective_skipped`` lists those).

Reported: bytes per request of both, the PCIe floor of the collective bytes (bytes ÷ measured pinned
bandwidth + a small copy's fixed latency, ``timing.copy_limits``), speed-up (baseline ÷
collective) and collective ÷ floor; medians of CUDA-event timings after warm-up (``timing.timed``).
Targets (reported, not asserted): every zoo model at B 512, L 1000 >= 40x its baseline and <= 2.5x its
floor; din >= 50x at B 512, L 1000 in both dtypes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import copy_limits, machine, timed  # noqa: E402
from benchmarks.zoo_batches import (  # noqa: E402
    batch_bytes,
    packed_cache,
    serving_batcher,
    store_layout,
    store_records,
)
from benchmarks.zoo_full_kv import bench_baseline  # noqa: E402
from benchmarks.zoo_synthetic import (  # noqa: E402
    N_ITEMS,
    PAPER,
    QUICK,
    head,
    make_models,
    model_config,
    reference_logits,
    synthetic_cache,
)
from collectivekv.cachestore.decode.batch import HostBatch  # noqa: E402
from collectivekv.cachestore.decode.decode import ResidentModel, ResidentZooModel  # noqa: E402
from collectivekv.cachestore.decode.graphs import GraphedDecoder  # noqa: E402
from collectivekv.model.config import ARCHS, LONG_ARCHS  # noqa: E402

BATCH_SIZES = (1, 64, 256, 512)
DTYPES = ("float16", "float32")
TOL = {"float16": 1e-2, "float32": 1e-3}  # max |logit - model.decode| (logits ~0.1; another cache moves them ~0.1)
RESULTS = ROOT / "benchmarks" / "results" / "zoo_latency"


def bench_collective(model: torch.nn.Module, layout: object, host: HostBatch, candidates: torch.Tensor,
                     pad_to: int, device: torch.device, args: argparse.Namespace) -> tuple[dict, torch.Tensor | None]:
    """CollectiveKV end to end: the packed batch (pinned ``host``) → ``GraphedDecoder.run`` (one replay: the
    copy of the batch and the candidates + decode). Returns (timing or ``{"skipped": why}``, logits (B, C)).
    The one place the collective path is built: adapt it here."""
    b, c = candidates.shape
    resident = ResidentModel(model, device) if model.cfg.arch == "din" else ResidentZooModel(model, device)
    try:
        graph = GraphedDecoder(resident, layout, n_users=b, pad_to=pad_to, n_candidates=c,
                               eager=device.type != "cuda")
        logits = graph.run(host, candidates.cpu()).clone()
    except Exception as exc:  # a layout the graphs do not take: keep the baseline's numbers
        return {"skipped": f"GraphedDecoder: {type(exc).__name__}: {exc}"[:400]}, None
    return timed(lambda: graph.run(host), device, args.warmup, args.repeats), logits


def max_diff(got: torch.Tensor | None, want: torch.Tensor) -> float | None:
    return None if got is None else float((got.float().cpu() - want.float().cpu()).abs().max())


def bench_config(arch: str, length: int, kv_dtype: str, args: argparse.Namespace, device: torch.device,
                 limits: dict) -> list[dict]:
    """Rows of one (arch, L, dtype) for every B: timings, bytes, floor and checks."""
    cfg = model_config(arch, length, args.shape, args.n_items, args.half)
    model, full_model = make_models(cfg, seed=0)
    model, full_model = model.to(device), full_model.to(device)
    top = max(args.batch_sizes)
    full = synthetic_cache(full_model, top, kv_dtype, 2, device)
    layout = store_layout(cfg, kv_dtype)
    records = store_records(model, layout, top, kv_dtype, device)
    g = torch.Generator(device=device).manual_seed(3)
    all_candidates = torch.randint(1, cfg.n_items + 1, (top, args.candidates), generator=g, device=device)
    rows = []
    for b in args.batch_sizes:
        t0 = time.perf_counter()
        cand = all_candidates[:b]
        row: dict = {"arch": arch, "L": length, "short": cfg.max_len if arch in LONG_ARCHS else None, "B": b,
                     "C": args.candidates, "dtype": kv_dtype}
        base, base_logits, base_bytes = bench_baseline(full_model, head(full, b), cand, kv_dtype, device, args)
        row["baseline"] = base
        row["baseline_bytes_per_request"] = base_bytes / b
        row["baseline_max_abs_diff"] = max_diff(base_logits, reference_logits(full_model, head(full, b), cand))
        row["baseline_ok"] = row["baseline_max_abs_diff"] <= TOL[kv_dtype]
        host = serving_batcher(layout, device, b).pack(np.arange(b), records[:b])
        c_bytes = batch_bytes(host) + cand.numel() * cand.element_size()  # the batch + the candidates
        row["collective_bytes_per_request"] = c_bytes / b
        row["bare_copy_ms"] = c_bytes / limits["floor_gb_per_s"] / 1e6  # bytes ÷ measured pinned bandwidth
        row["floor_ms"] = row["bare_copy_ms"] + limits["floor_fixed_ms"]
        coll, coll_logits = bench_collective(model, layout, host, cand, cfg.window_len, device, args)
        row["collective"] = coll
        want = reference_logits(model, packed_cache(host, model, device), cand)
        row["collective_max_abs_diff"] = max_diff(coll_logits, want)
        row["collective_ok"] = None if coll_logits is None else row["collective_max_abs_diff"] <= TOL[kv_dtype]
        c_ms = coll.get("median_ms")
        row["speedup"] = base["median_ms"] / c_ms if c_ms else None
        row["over_floor"] = c_ms / row["floor_ms"] if c_ms else None
        row["over_bare_copy"] = c_ms / row["bare_copy_ms"] if c_ms else None
        rows.append(row)
        print(progress(row, time.perf_counter() - t0), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def progress(r: dict, seconds: float) -> str:
    head_ = f"{r['dtype']} {r['arch']:>4} L {r['L']:>4} B {r['B']:>3}: baseline {r['baseline']['median_ms']:.3f} ms"
    check = f"(diff {r['baseline_max_abs_diff']:.1e}{'' if r['baseline_ok'] else ' MISMATCH'})"
    if "skipped" in r["collective"]:
        return f"{head_} {check}; collective SKIPPED: {r['collective']['skipped']}  [{seconds:.1f} s]"
    return (f"{head_} {check}; collective {r['collective']['median_ms']:.3f} ms (diff "
            f"{r['collective_max_abs_diff']:.1e}{'' if r['collective_ok'] else ' MISMATCH'}), "
            f"x{r['speedup']:.1f}, {r['over_floor']:.2f}x floor, {r['over_bare_copy']:.2f}x bare copy  "
            f"[{seconds:.1f} s]")


def configs(archs: list[str], shape: dict) -> list[tuple[str, int]]:
    """(arch, L): din and hstu at every length of the shape, the long archs at the long window."""
    return [(a, n) for a in archs for n in ((shape["long"],) if a in LONG_ARCHS else shape["lengths"])]


def targets(rows: list[dict], long: int) -> dict:
    """The targets at B 512, L ``long``: din >= 50x, every zoo model >= 40x and <= 2.5x its bare copy (bytes ÷
    pinned bandwidth; reported, not asserted)."""
    out = {}
    for r in rows:
        if r["B"] != 512 or r["L"] != long or r["speedup"] is None:
            continue
        want = 50 if r["arch"] == "din" else 40
        key = f"{r['arch']}_{r['dtype']}"
        out[key] = {"speedup": round(r["speedup"], 1), "speedup_target": want, "speedup_met": r["speedup"] >= want,
                    "over_floor": round(r["over_floor"], 2), "over_bare_copy": round(r["over_bare_copy"], 2)}
        if r["arch"] != "din":
            out[key].update(floor_target=2.5, floor_met=r["over_bare_copy"] <= 2.5)
    return out


def _diff(value: float | None, ok: bool | None) -> str:
    return "–" if value is None else f"{value:.0e}" + ("" if ok else " ✗")


def write_table(results: dict[str, dict], path: Path) -> None:
    """Markdown table arch × B × L of every dtype run, then the targets at B 512, L 1000."""
    lines = ["| dtype | arch | L | B | baseline ms | CollectiveKV ms | speed-up | floor ms | × floor | × bare copy | "
             "bytes/req base | bytes/req coll | max diff base / coll |", "|" + "---|" * 13]
    for res in results.values():
        for r in res["rows"]:
            c = r["collective"].get("median_ms")
            cells = [r["dtype"], r["arch"], f"{r['L']}" + (f" (short {r['short']})" if r["short"] else ""), r["B"],
                     f"{r['baseline']['median_ms']:.3f}", f"{c:.3f}" if c else "skipped",
                     f"{r['speedup']:.1f}" if c else "–", f"{r['floor_ms']:.3f}",
                     f"{r['over_floor']:.2f}" if c else "–", f"{r['over_bare_copy']:.2f}" if c else "–",
                     f"{r['baseline_bytes_per_request']:,.0f}",
                     f"{r['collective_bytes_per_request']:,.0f}",
                     f"{_diff(r['baseline_max_abs_diff'], r['baseline_ok'])} / "
                     f"{_diff(r['collective_max_abs_diff'], r['collective_ok'])}"]
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    aims = [f"- {key}: x{t['speedup']} (target {t['speedup_target']}x: {'met' if t['speedup_met'] else 'NOT met'}), "
            f"{t['over_floor']}x floor, {t['over_bare_copy']}x bare copy"
            + (f" (target {t['floor_target']}x the bare copy: {'met' if t['floor_met'] else 'NOT met'})"
               if "floor_met" in t else "")
            for res in results.values() for key, t in res["targets"].items()]
    first = next(iter(results.values()))
    note = "CPU DRY RUN: not the GPU result. " if first["dry_run"] else ""
    dev = first["machine"].get("gpu") or first["machine"].get("cpu", "cpu")
    runs = "".join(f"- {d}: `{r['command']}` (medians of {r['config']['repeats']} timings, "
                   f"{r['copy_limits']['floor_gb_per_s']:.1f} GB/s pinned)\n" for d, r in results.items())
    path.write_text(f"# Zoo decode latency ({dev})\n\n{note}Host memory → logits; floor = CollectiveKV bytes ÷ "
                    f"pinned bandwidth + a small copy's fixed latency, bare copy = bytes ÷ pinned bandwidth; bytes "
                    f"per request; max |logits − "
                    f"model.decode| (✗: beyond the tolerance).\n\n{runs}\n" + "\n".join(lines)
                    + ("\n\nTargets at B 512, L 1000:\n\n" + "\n".join(aims) if aims else "") + "\n")
    print(f"wrote {path}")


def plot(results: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (dtype, res) in zip(axes[0], results.items(), strict=True):
        for i, (arch, length) in enumerate(sorted({(r["arch"], r["L"]) for r in res["rows"]})):
            rows = [r for r in res["rows"] if (r["arch"], r["L"]) == (arch, length)]
            bs = [r["B"] for r in rows]
            ax.plot(bs, [r["baseline"]["median_ms"] for r in rows], "--", marker=".", color=f"C{i}",
                    label=f"{arch} L {length}: full KV")
            coll = [r["collective"].get("median_ms", np.nan) for r in rows]
            if not all(np.isnan(coll)):
                ax.plot(bs, coll, "-", marker="o", color=f"C{i}", label=f"{arch} L {length}: CollectiveKV")
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="ms (median), host memory → logits",
               title=f"store {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    dev = next(iter(results.values()))["machine"]
    fig.suptitle(("CPU DRY RUN — " if dev["device"] == "cpu" else "") + f"zoo decode on {dev.get('gpu', 'cpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (the CPU dry run)")
    p.add_argument("--dtype", choices=[*DTYPES, "both"], default="both", help="store dtype (default both)")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma list (default every arch)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,64,256,512; --quick 1,3)")
    p.add_argument("--candidates", type=int, default=1, help="candidates per user C")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--half", action="store_true",
                   help="half-cache stores at CR <= 0.2%% (joint index, int8 parts, keys from the index): "
                        "zoo_latency_half_<dtype>.json")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    args.shape = QUICK if args.quick else PAPER
    args.stem = "zoo_latency_half" if args.half else "zoo_latency"
    args.n_items = 50 if args.quick else N_ITEMS
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else (
        [1, 3] if args.quick else list(BATCH_SIZES))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 30)
    dry = torch.device(args.device).type != "cuda"
    args.out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "ckv-zoo-latency-dryrun" if dry else RESULTS)
    return args


def run_dtype(kv_dtype: str, args: argparse.Namespace, device: torch.device, limits: dict, info: dict,
              command: str) -> dict:
    """Every (arch, L) at one store dtype: the result written as ``zoo_latency_<dtype>.json``. A model that
    fails is listed under ``errors`` and the others carry on."""
    rows: list[dict] = []
    errors: list[str] = []
    with torch.inference_mode():
        for arch, length in configs(args.archs.split(","), args.shape):
            try:
                rows += bench_config(arch, length, kv_dtype, args, device, limits)
            except Exception as exc:  # one failing model must not lose the others' numbers
                errors.append(f"{arch} L {length}: {type(exc).__name__}: {exc}"[:500])
                print(f"{kv_dtype} {arch} L {length} FAILED: {errors[-1]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    skipped = sorted({f"{r['arch']} L {r['L']}: {r['collective']['skipped']}" for r in rows
                      if "skipped" in r["collective"]})
    res = {"benchmark": "zoo_latency", "dry_run": device.type != "cuda", "machine": info, "command": command,
           "config": {**{k: v for k, v in args.shape.items() if k != "lengths"}, "n_items": args.n_items,
                      "store_dtype": kv_dtype, "half_cache": args.half, "candidates": args.candidates,
                      "batch_sizes": args.batch_sizes,
                      "warmup": args.warmup, "repeats": args.repeats, "tolerance": TOL[kv_dtype]},
           "copy_limits": limits, "rows": rows, "targets": targets(rows, args.shape["long"]), "errors": errors,
           "collective_skipped": skipped}
    out = args.out_dir / f"{args.stem}_{kv_dtype}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    print(json.dumps(res["targets"], indent=1))
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 when a check failed or a model failed (after writing every output), else 0."""
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for a dry run")
    torch.set_grad_enabled(False)
    info = {**machine(device), "triton": _triton_version()}
    print(json.dumps(info), flush=True)
    limits = copy_limits(device, device.type == "cuda", args.quick, args.warmup, args.repeats)
    print(f"copy: floor {limits['floor_gb_per_s']:.2f} GB/s + {limits['floor_fixed_ms'] * 1e3:.1f} us fixed")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    failed = False
    for kv_dtype in DTYPES if args.dtype == "both" else (args.dtype,):
        res = run_dtype(kv_dtype, args, device, limits, info, command)
        failed |= bool(res["errors"]) or any(r["baseline_ok"] is False or r["collective_ok"] is False
                                             for r in res["rows"])
    results = {d: json.loads((args.out_dir / f"{args.stem}_{d}.json").read_text()) for d in DTYPES
               if (args.out_dir / f"{args.stem}_{d}.json").exists()}  # every dtype run into this folder
    write_table(results, args.out_dir / f"{args.stem}.md")
    plot(results, args.out_dir / f"{args.stem}.png")
    if failed:
        print("FAILED: logits differ from model.decode beyond the tolerance (*_ok in the rows) or a model failed "
              "(errors in the JSON)")
    return int(failed)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
