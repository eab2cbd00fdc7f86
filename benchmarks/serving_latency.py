"""Request latency end to end — user ids on the host → scores on the host — resident tier vs the LMDB fetches.

    python benchmarks/serving_latency.py [--lengths 50,1000] [--batch-sizes 1,64,512] [--repeats 400] [--profile]
                                         [--out benchmarks/results/serving_latency/serving_latency.json]

For each history length L a published LMDB store is built as ``benchmarks/zero_copy.py`` builds it
(``paper_store.build_fetch_store``: fp16 caches, 100,000 users at L <= 100, else 20,000; every page touched),
and the paper's model (d_a 256, 8 heads, d_u 1, pool 10,000; fused kernel, fp16 pool rows) scores one
candidate per user. Per batch size B, after warm-up, three ways of serving a request of B random users:

- ``runtime``: ``DecodeRuntime.score(ids, candidates)`` with the default ServingConfig (tier auto: the whole
  store on the GPU) — the Python API a server calls;
- ``resident``: the step the runtime makes, alone: one replay of :class:`cachestore.tier.graph.ResidentRequest`
  — ids copy, lookup kernel, decode reading the records in place in the tier's arena, scores and the
  cold-start mask copied back inside the graph;
- ``zero_copy``: ``MappedBatcher.fetch`` on the CPU, then the graph gathers from the registered LMDB map;
- ``copy``: ``HostBatcher.fetch`` (every record copied into a pinned buffer), then the graph's copy.

``request_ms``: wall time (perf_counter) from the ids on the host to the scores in host memory, median of
--repeats, in 8 rounds round-robin over the ways; ``replay_ms``: CUDA events around the resident replay alone.
The three give the same logits (checked). The process is pinned to one CPU core. GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.graph_paths import fused_config  # noqa: E402
from benchmarks.paper_store import N_ITEMS, build_fetch_store, paper_model  # noqa: E402
from benchmarks.timing import sweep_lengths, timed  # noqa: E402
from collectivekv.cachestore.decode.fused_config import STORE  # noqa: E402
from collectivekv.cachestore.decode.graphs import GraphedDecoder  # noqa: E402
from collectivekv.cachestore.decode.mapped import MappedBatcher  # noqa: E402
from collectivekv.cachestore.decode.runtime import DecodeRuntime  # noqa: E402
from collectivekv.cachestore.decode.runtime_config import ServingConfig  # noqa: E402
from collectivekv.cachestore.tier.graph import ResidentRequest  # noqa: E402
from collectivekv.cachestore.tier.tier import ResidentTier  # noqa: E402

WAYS = ("runtime", "resident", "zero_copy", "copy")
OUT = ROOT / "benchmarks" / "results" / "serving_latency" / "serving_latency.json"


def round_robin(fns: dict[str, Callable[[np.ndarray], object]], id_sets: list[np.ndarray]) -> dict[str, list[float]]:
    """Wall milliseconds of every way over the same requests, in 8 rounds (drift hits every way alike)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    per = max(1, len(id_sets) // 8)
    for r in range(8):
        for k, fn in fns.items():
            for ids in id_sets[r * per : (r + 1) * per]:
                t0 = time.perf_counter()
                fn(ids)
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return samples


def requests(tier: ResidentTier, copying, zero: MappedBatcher, resident, b: int, length: int, users: int,
             rng: np.random.Generator) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], dict]:
    """One request function per way (ids → host logits), each over its own graph for (B, L, C 1)."""
    graphs = {k: GraphedDecoder(resident, tier.layout, n_users=b, pad_to=length, n_candidates=1) for k in WAYS[1:]}
    req = ResidentRequest(graphs["resident"], tier)
    cand = rng.integers(1, N_ITEMS + 1, (b, 1))
    for k in ("copy", "zero_copy"):
        graphs[k]._stage(cand)

    def host_path(k: str, batcher) -> Callable[[np.ndarray], np.ndarray]:
        def go(ids: np.ndarray) -> np.ndarray:
            return graphs[k].run(batcher.fetch(ids)).float().cpu().numpy()
        return go

    fns = {"resident": lambda ids: req.run(ids, None, cand)[0], "zero_copy": host_path("zero_copy", zero),
           "copy": host_path("copy", copying)}
    try:  # the Python API a server calls (tier auto: the whole store on the GPU)
        runtime = DecodeRuntime(resident.model, tier.layout.model_version, tier.reader,
                                ServingConfig(device=str(resident.device), batch_users=b))
        fns = {"runtime": lambda ids: runtime.score(ids, cand).logits, **fns}
    except Exception as exc:  # reported in the row, the other ways still measured
        print(f"runtime way unavailable: {exc!r}", flush=True)
        runtime = None
    return fns, {"graphs": graphs, "request": req, "runtime": runtime}


def bench_length(length: int, users: int, batch_sizes: list[int], args: argparse.Namespace, tmp: Path,
                 device: torch.device) -> dict:
    copying, build_s = build_fetch_store(tmp, length, users, max(batch_sizes), True, "float16")
    reader, layout = copying.reader, copying.layout
    zero = MappedBatcher(layout, reader=reader, pin=True, batch_users=max(batch_sizes))
    t0 = time.perf_counter()
    tier = ResidentTier(reader, device, 1 << 40, batch_users=max(batch_sizes))
    out: dict = {"users_in_store": users, "build_seconds": round(build_s, 2),
                 "tier_load_seconds": round(time.perf_counter() - t0, 2), "tier_bytes": tier.resident_bytes,
                 "tier_mode": tier.mode, "rows": {}}
    resident = paper_model(length, device)
    rng = np.random.default_rng(length)
    for b in batch_sizes:
        with torch.inference_mode():
            fns, held = requests(tier, copying, zero, resident, b, length, users, rng)
            ids = rng.integers(0, users, b)
            logits = {k: fn(ids) for k, fn in fns.items()}
            diff = max(float(np.abs(logits[k] - logits["copy"]).max()) for k in fns)
            runtime = held["runtime"]
            tier_mode = "unavailable" if runtime is None else runtime.tier.mode if runtime.tier is not None else "off"
            if diff > 1e-4:
                raise AssertionError(f"L={length} B={b}: the ways' logits differ by {diff}")
            for _ in range(8):  # warm-up: every ring buffer's graph captured
                for fn in fns.values():
                    fn(rng.integers(0, users, b))
            samples = round_robin(fns, [rng.integers(0, users, b) for _ in range(args.repeats)])
            graph, captured = held["graphs"]["resident"], held["request"]._captured
            replay = timed(lambda g=graph, c=captured: g._replay(c, None), device, 5, args.repeats)
            profile = device_profile(lambda g=graph, c=captured: g._replay(c, None), 50) if args.profile else None
            timeline = device_timeline(lambda g=graph, c=captured: g._replay(c, None), 30) if args.profile else None
            launches = compare_launch(tier, resident, b, length, held["request"], users, rng, args)
        row = {"request_ms": {k: round(statistics.median(v), 4) for k, v in samples.items()},
               "request_p90_ms": {k: round(statistics.quantiles(v, n=10)[-1], 4) for k, v in samples.items()},
               "resident_replay_ms": round(replay["median_ms"], 4), "max_abs_diff": diff,
               "runtime_tier": tier_mode}
        if profile is not None:
            row["resident_replay_profile_us"] = profile
            row["resident_replay_timeline_us"] = timeline
        if launches:
            row["resident_launch_compare_ms"] = launches
        if runtime is not None:  # its tier's memory back (the reader stays open: the other ways share it)
            runtime.tier.close()
        out["rows"][str(b)] = row
        print(f"L={length} B={b}: " + json.dumps(row), flush=True)
    tier.close()
    zero.close()
    reader.close()
    return out


def compare_launch(tier: ResidentTier, resident, b: int, length: int, default: ResidentRequest, users: int,
                   rng: np.random.Generator, args: argparse.Namespace) -> dict[str, float]:
    """--compare-launch: the resident request (median wall ms) with each FusedConfig launch setting
    (";"-separated "name=value,..." as decode_latency.py's; "default" the runtime's), round-robin, logits
    checked against the default's."""
    if not args.compare_launch:
        return {}
    cand = default.decoder.candidates_host.numpy().copy()
    reqs = {"default": default}
    for spec in dict.fromkeys(x.strip() for x in args.compare_launch.split(";") if x.strip()):
        g = GraphedDecoder(resident, tier.layout, n_users=b, pad_to=length, n_candidates=1,
                           fused=fused_config(STORE, spec))
        reqs[spec] = ResidentRequest(g, tier)
    ids = rng.integers(0, users, b)
    want = default.run(ids, None, cand)[0]
    for spec, req in reqs.items():
        diff = float(np.abs(req.run(ids, None, cand)[0] - want).max())
        if diff > 1e-4:
            raise AssertionError(f"launch {spec}: logits differ from the default's by {diff}")
    fns = {k: (lambda ids, r=r: r.run(ids, None, cand)) for k, r in reqs.items()}
    samples = round_robin(fns, [rng.integers(0, users, b) for _ in range(args.repeats)])
    out = {k: round(statistics.median(v), 4) for k, v in samples.items()}
    print(f"L={length} B={b} launch settings: {json.dumps(out)}", flush=True)
    return out


def device_profile(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Device microseconds per call of every kernel and copy ``fn`` runs (a graph replay included: CUPTI sees
    its nodes), from torch.profiler over ``repeats`` calls, largest first; "total" their sum."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:90]] = per.get(e.name[:90], 0.0) + e.device_time / repeats
    out = {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
    return {"total": round(sum(per.values()), 2), **out}


def device_timeline(fn: Callable[[], object], repeats: int) -> list[list]:
    """The device steps of one call of ``fn`` (a graph replay), in order: [name, start, duration] in
    microseconds from the call's first step — the call whose span is the median of ``repeats``, each run
    alone (synchronized), its kernels and copies told apart by their launch's correlation id."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    calls: dict[int, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "correlation" in e.get("args", {}):
            calls.setdefault(e["args"]["correlation"], []).append((e["ts"], e["dur"], e["name"][:60]))
    spans = sorted(calls.values(), key=lambda c: max(t + d for t, d, _ in c) - min(t for t, _, _ in c))
    steps = sorted(spans[len(spans) // 2])
    t0 = steps[0][0]
    return [[name, round(t - t0, 2), round(d, 2)] for t, d, name in steps]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(result["lengths"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        rows = result["lengths"][length]["rows"]
        bs = [int(b) for b in rows]
        for k, color in zip(WAYS, ("C1", "C2", "C3", "C0"), strict=True):
            if any(k not in rows[str(b)]["request_ms"] for b in bs):
                continue
            ax.plot(bs, [rows[str(b)]["request_ms"][k] for b in bs], "-o", color=color, label=k.replace("_", "-"))
        ax.plot(bs, [rows[str(b)]["resident_replay_ms"] for b in bs], ":", color="C2", label="resident replay only")
        ax.axhline(0.15, color="grey", lw=0.8, ls="--", label="0.15 ms target")
        ax.set(xscale="log", yscale="log", xlabel="batch size (users)", ylabel="ms per request (median)",
               title=f"L = {length}, fp16: ids on host → scores on host")
        ax.legend(fontsize=7)
    fig.suptitle(result["machine"].get("gpu", ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="50,1000")
    p.add_argument("--batch-sizes", default="1,64,512")
    p.add_argument("--repeats", type=int, default=400)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--compare-launch", default=None,
                   help='also time the resident request with these FusedConfig settings, ";"-separated '
                        '(e.g. "split_l=1;block_l=32,num_warps=2")')
    p.add_argument("--profile", action="store_true",
                   help="also list the resident replay's kernels and copies (device us per request, torch.profiler)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("serving_latency.py measures the GPU path: run it on a CUDA machine")
    device = torch.device("cuda")
    sweep_lengths("serving_latency", "float16", args, device, bench_length, plot)


if __name__ == "__main__":
    main()
