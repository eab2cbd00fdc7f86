"""Copying fetch vs zero-copy fetch, per request: CPU fetch, GPU replay, and the two together.

    python benchmarks/zero_copy.py [--lengths 50,1000] [--batch-sizes 1,64,256,512] [--store-dtype float16]
                                   [--out benchmarks/results/zero_copy/zero_copy.json]

For each L a published LMDB store is built the way the nightly job builds it (``paper_store.build_fetch_store``:
100,000 users at L <= 100, else 20,000; every page touched once first), and the process is pinned to one
CPU core. Per batch size B (random users, median of --repeats):

- ``fetch_ms``: ``HostBatcher.fetch`` (lookups + every record copied into a pinned buffer) against
  ``MappedBatcher.fetch`` (lookups + a 40·B-byte gather table; ``cachestore/decode/mapped.py``), in 8 rounds of
  consecutive calls each (``alternate``);
- on CUDA, ``replay_ms``: one replay of ``GraphedDecoder`` (the paper's model: d_a 256, 8 heads, d_u 1,
  pool 10,000; fused kernel, pool rows at the store dtype) scoring the copied batch (copy in pieces
  beside the decode) or the zero-copy one (header copy, gather from the registered map, decode), CUDA
  events, round-robin in 8 rounds; the two give the same logits (checked, max abs diff recorded); the
  zero-copy graph gathers in the same pieces beside the decode as the copying one copies (``overlap``);
- on CUDA, ``request_ms``: wall time of fetch + replay + synchronize, one request after another — what a
  serving process spends per batch.

Without a GPU only ``fetch_ms`` is measured. Writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_store import N_ITEMS, build_fetch_store, paper_model  # noqa: E402
from benchmarks.timing import sweep_lengths, timed  # noqa: E402
from collectivekv.cachestore.decode.graphs import GraphedDecoder  # noqa: E402
from collectivekv.cachestore.decode.mapped import MappedBatcher  # noqa: E402

WAYS = ("copy", "zero_copy")


def alternate(fns: dict[str, Callable[[], float]], repeats: int, rounds: int = 8) -> dict[str, float]:
    """Median of each fn's returned milliseconds over ``repeats`` calls: in ``rounds`` rounds, each fn
    called repeats / rounds times in a row (a serving process fetches one way only: strict alternation
    would let one way's copies evict the other's B-tree pages), so drift hits every fn alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k] += [fn() for _ in range(max(1, repeats // rounds))]
    return {k: round(statistics.median(v), 4) for k, v in samples.items()}


def wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_length(length: int, users: int, batch_sizes: list[int], args: argparse.Namespace, tmp: Path,
                 device: torch.device) -> dict:
    cuda = device.type == "cuda"
    copying, build_s = build_fetch_store(tmp, length, users, max(batch_sizes), cuda, args.store_dtype)
    reader, layout = copying.reader, copying.layout
    zero = MappedBatcher(layout, reader=reader, pin=cuda, batch_users=max(batch_sizes))
    batchers = {"copy": copying, "zero_copy": zero}
    rng = np.random.default_rng(length)
    out: dict = {"users_in_store": users, "build_seconds": round(build_s, 2),
                 "data_mdb_bytes": zero.store_map.nbytes, "rows": {}}
    resident = paper_model(length, device) if cuda else None
    for b in batch_sizes:
        fetches = {k: lambda k=k, b=b: wall(lambda: batchers[k].fetch(rng.integers(0, users, b))) for k in WAYS}
        row: dict = {"fetch_ms": alternate(fetches, args.repeats)}
        if cuda:
            with torch.inference_mode():
                bench_gpu(row, resident, layout, batchers, users, b, length, args, rng)
        out["rows"][str(b)] = row
        print(f"L={length} B={b}: " + json.dumps(row), flush=True)
    zero.close()
    reader.close()
    return out


def bench_gpu(row: dict, resident, layout, batchers: dict, users: int, b: int, length: int,
              args: argparse.Namespace, rng: np.random.Generator) -> None:
    graph = GraphedDecoder(resident, layout, n_users=b, pad_to=length, n_candidates=1)
    ids = rng.integers(0, users, b)
    targets = torch.from_numpy(rng.integers(1, N_ITEMS + 1, (b, 1)))
    batches = {k: batchers[k].fetch(ids) for k in WAYS}
    logits = {k: graph.run(batches[k], targets).clone() for k in WAYS}
    row["max_abs_diff"] = float((logits["copy"] - logits["zero_copy"]).abs().max())
    if row["max_abs_diff"] > 1e-5:
        raise AssertionError(f"L={length} B={b}: zero-copy logits differ from the copied batch's by "
                             f"{row['max_abs_diff']}")
    device = graph.device
    rounds = {k: [] for k in WAYS}
    for _ in range(8):  # round-robin: drift of the machine hits both alike
        for k in WAYS:
            t = timed(lambda k=k: graph.run(batches[k]), device, 2, max(1, args.repeats // 8))
            rounds[k].append(t["median_ms"])
    row["replay_ms"] = {k: round(statistics.median(v), 4) for k, v in rounds.items()}
    row["replay_round_medians_ms"] = rounds

    def request(k: str) -> float:
        def go() -> None:
            graph.run(batchers[k].fetch(rng.integers(0, users, b)), targets)
            torch.cuda.current_stream(device).synchronize()
        return wall(go)

    for k in WAYS:  # every ring buffer's graph captured before timing
        for _ in range(4):
            request(k)
    row["request_ms"] = alternate({k: lambda k=k: request(k) for k in WAYS}, args.repeats)
    row["bytes"] = {"copy": batches["copy"].used_bytes, "zero_copy": batches["zero_copy"].pcie_bytes}


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lengths = list(result["lengths"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        rows = result["lengths"][length]["rows"]
        bs = [int(b) for b in rows]
        for metric, style in (("fetch_ms", "-o"), ("replay_ms", "--s"), ("request_ms", ":^")):
            for k, color in zip(WAYS, ("C0", "C3"), strict=True):
                ys = [rows[str(b)].get(metric, {}).get(k) for b in bs]
                if any(y is not None for y in ys):
                    ax.plot(bs, ys, style, color=color, label=f"{metric[:-3]} ({k.replace('_', '-')})")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="batch size (users)", ylabel="ms (median)",
               title=f"L = {length}: copying vs zero-copy fetch")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['machine'].get('gpu') or result['machine'].get('cpu', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="50,1000")
    p.add_argument("--batch-sizes", default="1,64,256,512")
    p.add_argument("--store-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "zero_copy/zero_copy.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sweep_lengths("zero_copy", args.store_dtype, args, device, bench_length, plot)


if __name__ == "__main__":
    main()
