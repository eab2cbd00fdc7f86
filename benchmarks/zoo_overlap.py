"""Copy pieces of the zoo's serving graph: a request's time per ``GraphedDecoder(overlap=K)`` for each zoo model.

GPU only (torch + numpy; no lmdb; about a minute):

    python benchmarks/zoo_overlap.py [--archs sim,eta,sdim,twin,hstu] [--overlaps 1,2,3] [--dtype float16]
        [--concurrent true,false] [--split true,false]
        → benchmarks/results/zoo_latency/zoo_overlap_<dtype>.json (and a line per setting on stdout)

The shapes and records are :mod:`benchmarks.zoo_latency`'s (paper shape, full histories of L 1,000, B 512, one
candidate). With K pieces the graph copies the batch in K pieces and runs the model's per-piece launches (SIM, ETA,
SDIM, TWIN: the short and long stages; HSTU: the first layer's history) as each piece lands, every launch serving the
users whose records end in it; concurrent: each piece's launches on a stream of their own. HSTU's batch is the one a
serving runtime with graphs packs, split by layer (``cachestore.decode.layer_batch``: its first buffer in K pieces,
then the later layers' buffer); ``--split false`` (or ``true,false``) times the one-buffer batch. Per model every
setting is its own captured graph serving the same pinned batch, timed round-robin (median CUDA-event time of ``run``
per round, then the median over rounds) so that drift of the machine spreads over all of them; every setting's
logits are checked equal to the first setting's. ``cachestore.decode.copy_plan.ARCH_OVERLAP`` holds the chosen K per
model (``LAYER_OVERLAP``: HSTU's split batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import machine, timed  # noqa: E402
from benchmarks.zoo_batches import one_buffer, paper_batch  # noqa: E402
from collectivekv.cachestore.decode.decode import ResidentZooModel  # noqa: E402
from collectivekv.cachestore.decode.graphs import GraphedDecoder  # noqa: E402
from collectivekv.cachestore.decode.layer_batch import LayerBatch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_latency"


def round_robin(graphs: list[GraphedDecoder], host: object, device: torch.device, rounds: int, repeats: int,
                warmup: int = 5) -> list[list[float]]:
    """Per graph, the median ms of ``repeats`` replays serving ``host`` (one batch, or a list: one per graph) after
    ``warmup`` in each of ``rounds`` rounds, the graphs taking turns so that drift of the machine spreads over all."""
    hosts = host if isinstance(host, list) else [host] * len(graphs)
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for i, (graph, batch) in enumerate(zip(graphs, hosts, strict=True)):
            times[i].append(timed(lambda g=graph, h=batch: g.run(h), device, warmup, repeats)["median_ms"])
    return times


def bench_arch(arch: str, overlaps: list[int], concurrent: list[bool], args: argparse.Namespace,
               device: torch.device) -> list[dict]:
    """Rows (overlap, concurrent, split, median ms, per-round medians, max |logit difference| to the first setting);
    HSTU with each batch of ``args.split`` (split by layer, the one-buffer batch), the others their one batch."""
    cfg, model, layout, host, cand = paper_batch(arch, args.batch, args.dtype, device)
    splits = args.split if arch == "hstu" else [True]
    hosts = {s: host if s else one_buffer(host, pin=True) for s in splits}  # the same records, one buffer
    resident = ResidentZooModel(model, device)
    settings = [(k, conc, s) for s in splits for k in overlaps for conc in concurrent]
    graphs = [GraphedDecoder(resident, layout, n_users=args.batch, pad_to=cfg.window_len, n_candidates=1, overlap=k,
                             concurrent=conc) for k, conc, _ in settings]
    logits = [gr.run(hosts[s], cand).clone() for gr, (_, _, s) in zip(graphs, settings, strict=True)]
    rounds = round_robin(graphs, [hosts[s] for _, _, s in settings], device, args.rounds, args.repeats)
    rows = []
    for (k, conc, s), ms, out in zip(settings, rounds, logits, strict=True):
        split = isinstance(hosts[s], LayerBatch)
        rows.append({"arch": arch, "overlap": k, "concurrent": conc, "split_by_layer": split,
                     "median_ms": round(statistics.median(ms), 4), "rounds_ms": [round(x, 4) for x in ms],
                     "max_abs_diff": float((out - logits[0]).abs().max())})
        print(f"{args.dtype} {arch:4s} overlap {k} concurrent {conc!s:5s} split {split!s:5s}: "
              f"{rows[-1]['median_ms']:.4f} ms (max diff {rows[-1]['max_abs_diff']:.1e})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="sim,eta,sdim,twin,hstu")
    p.add_argument("--overlaps", default="1,2,3")
    p.add_argument("--concurrent", default="true", help="comma list of true/false (default true)")
    p.add_argument("--split", default="true", help="HSTU: comma list of true/false — its batch split by layer (the "
                   "serving runtime's with graphs) and/or the one-buffer batch (default true)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    overlaps = [int(x) for x in args.overlaps.split(",")]
    concurrent = [x.strip().lower() == "true" for x in args.concurrent.split(",")]
    args.split = [x.strip().lower() == "true" for x in args.split.split(",")]
    with torch.inference_mode():
        rows = [row for arch in args.archs.split(",") for row in bench_arch(arch, overlaps, concurrent, args, device)]
    out = args.out or RESULTS / f"zoo_overlap_{args.dtype}.json"
    doc = {"benchmark": "zoo_overlap", "command": "zoo_overlap.py " + " ".join(sys.argv[1:]),
           "machine": machine(device), "batch": args.batch, "L": 1000, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
