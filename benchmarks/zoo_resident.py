"""Resident request latency for every model: user ids on the host → scores on the host, through the GPU tier.

    python benchmarks/zoo_resident.py [--archs din,sim,eta,sdim,twin,hstu] [--length 1000] [--batch-sizes 1,64,512]
                                      [--dtype float16] [--repeats 300]
                                      [--out benchmarks/results/zoo_latency/zoo_resident_float16.json]

Each model at the paper's shape (``benchmarks/zoo_synthetic.PAPER``; SIM, ETA, SDIM, TWIN at their long window
of L behaviours, din and HSTU caching L) gets the synthetic records of ``benchmarks/zoo_latency.py``, published
as a real store (Parquet → the store build → LMDB) and loaded whole into a :class:`cachestore.tier.ResidentTier`
on the GPU. Per batch size B, one candidate per user, all users present:

- ``copy_ms``: the pinned packed batch → ``GraphedDecoder.run`` (one replay: the batch copied, then decoded),
  CUDA events — zoo_latency's CollectiveKV column (the CPU fetch from LMDB is not in it);
- ``resident_ms``: ``ResidentRequest.run(ids, None, candidates)`` — ids and candidates into pinned memory, one
  replay (ids in, lookup kernel, the model's decode over the arena, scores out), synchronize — wall time
  (perf_counter), the host's part included;
- ``resident_replay_ms``: CUDA events around the resident replay alone.

The resident logits are checked against the copy path's. Medians of --repeats after warm-up. Measured on a
GPU; ``--device cpu --quick`` is a dry run of the same steps (eager, tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import machine, timed  # noqa: E402
from benchmarks.zoo_batches import VERSION, store_layout, store_records  # noqa: E402
from benchmarks.zoo_latency import bench_collective  # noqa: E402
from benchmarks.zoo_synthetic import N_ITEMS, PAPER, QUICK, make_models, model_config  # noqa: E402
from collectivekv.cachestore.decode.batch import HostBatcher  # noqa: E402
from collectivekv.cachestore.decode.decode import ResidentModel, ResidentZooModel  # noqa: E402
from collectivekv.cachestore.decode.graphs import GraphedDecoder  # noqa: E402
from collectivekv.cachestore.store.entry import entry_schema, record_length  # noqa: E402
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE  # noqa: E402
from collectivekv.cachestore.store.publish import build_and_publish, open_current  # noqa: E402
from collectivekv.cachestore.store.reader import StoreReader  # noqa: E402
from collectivekv.cachestore.store.record import HEADER_SIZE, write_layout  # noqa: E402
from collectivekv.cachestore.tier.graph import ResidentRequest  # noqa: E402
from collectivekv.cachestore.tier.tier import ResidentTier  # noqa: E402
from collectivekv.model.config import ARCHS  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "zoo_latency"


def publish_records(root: Path, layout: object, records: list[bytes]) -> StoreReader:
    """Publish records (user b = records[b]) through the store build, as the prefill's Parquet would hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"user_id": b, "length": record_length(r), "payload": r[HEADER_SIZE:], "model_version": VERSION,
             "checksum": zlib.crc32(r[HEADER_SIZE:])} for b, r in enumerate(records)]
    pdir = root / "parquet"
    pdir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=entry_schema()), pdir / "part-00000.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    build_and_publish(root / "store", pdir, progress=False)
    return StoreReader(open_current(root / "store"))


def wall_ms(fn, warmup: int, repeats: int) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device, tmp: Path) -> list[dict]:
    cfg = model_config(arch, args.length, QUICK if args.quick else PAPER, N_ITEMS)
    model = make_models(cfg, seed=0)[0].to(device)
    layout = store_layout(cfg, args.dtype)
    top = max(args.batch_sizes)
    records = store_records(model, layout, top, args.dtype, device)
    reader = publish_records(tmp / arch, layout, records)
    tier = ResidentTier(reader, device, 1 << 40, batch_users=top, expected_model_version=VERSION)
    resident = ResidentModel(model, device) if arch == "din" else ResidentZooModel(model, device)
    cand_all = torch.randint(1, N_ITEMS + 1, (top, 1), generator=torch.Generator().manual_seed(3))
    rows = []
    for b in args.batch_sizes:
        cand = cand_all[:b]
        batcher = HostBatcher(layout, pin=device.type == "cuda", n_buffers=1, batch_users=b)
        host = batcher.pack(np.arange(b), records[:b])
        copy, copy_logits = bench_collective(model, layout, host, cand.to(device), cfg.window_len, device, args)
        graph = GraphedDecoder(resident, layout, n_users=b, pad_to=cfg.window_len, n_candidates=1,
                               eager=device.type != "cuda")
        request = ResidentRequest(graph, tier)
        ids, cand_np = np.arange(b), cand.numpy()
        logits, present = request.run(ids, None, cand_np)
        diff = float(np.abs(logits - copy_logits.float().cpu().numpy()).max())
        if not present.all() or diff > 1e-3:
            raise AssertionError(f"{arch} B {b}: resident logits differ from the copy path's by {diff}")
        res_ms = wall_ms(lambda r=request, i=ids, c=cand_np: r.run(i, None, c), args.warmup, args.repeats)
        replay = (timed(lambda g=graph, c=request._captured: g._replay(c, None), device, 5, args.repeats)
                  if device.type == "cuda" else {"median_ms": float("nan")})  # (eager on the CPU: no graph)
        row = {"arch": arch, "L": args.length, "B": b, "copy_ms": round(copy["median_ms"], 4),
               "resident_ms": round(res_ms, 4), "resident_replay_ms": round(replay["median_ms"], 4),
               "max_abs_diff": diff, "tier_bytes": tier.resident_bytes}
        rows.append(row)
        print(json.dumps(row), flush=True)
    tier.close()
    reader.close()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--batch-sizes", default="1,64,512")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the same steps eagerly (a dry run, with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (benchmarks/zoo_synthetic.QUICK): a dry run")
    args = p.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for arch in args.archs.split(","):
            rows += bench_arch(arch, args, device, Path(tmp))
    out = args.out or OUT / f"zoo_resident_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "zoo_resident", "command": " ".join(["python", *sys.argv]),
                               "machine": machine(device), "dtype": args.dtype, "rows": rows}, indent=1) + "\n")
    print("| model | B | copy (graph) ms | resident request ms | resident replay ms |")
    for r in rows:
        print(f"| {r['arch']} | {r['B']} | {r['copy_ms']} | {r['resident_ms']} | {r['resident_replay_ms']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
