"""Where one CollectiveKV decode of each model spends its GPU time: per-kernel CUDA time (torch.profiler).

GPU only (torch + numpy; no lmdb):

    python benchmarks/zoo_kernel_breakdown.py [--archs sim,eta,sdim,twin,hstu] [--batch 512] [--dtype float16]
        → benchmarks/results/zoo_latency/zoo_kernel_breakdown_<dtype>.json (and a table on stdout)

The shapes and the records are :mod:`benchmarks.zoo_latency`'s (paper shape, full histories of L 1,000:
the long window of SIM/ETA/SDIM/TWIN, HSTU's max_len). The packed batch is copied to the device once; the
decode body the CUDA graph captures (:func:`cachestore.decode.graphs.static_decode`, path "fused") then runs
eagerly ``--repeats`` times under the profiler after warm-up, and every kernel's total CUDA time is divided
by the repeats: the sum is the device time of one decode without the copy, each kernel's share says what
bounds it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import machine  # noqa: E402
from benchmarks.zoo_batches import store_layout, store_records  # noqa: E402
from benchmarks.zoo_synthetic import N_ITEMS, PAPER, make_models, model_config  # noqa: E402
from collectivekv.cachestore.decode.batch import HostBatcher  # noqa: E402
from collectivekv.cachestore.decode.decode import ResidentModel, ResidentZooModel  # noqa: E402
from collectivekv.cachestore.decode.fused import FUSED  # noqa: E402
from collectivekv.cachestore.decode.graphs import static_decode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_latency"


def breakdown(arch: str, b: int, kv_dtype: str, repeats: int, device: torch.device) -> dict:
    """Per-kernel CUDA ms of one fused decode of ``b`` users of ``arch`` (L 1,000)."""
    cfg = model_config(arch, 1000, PAPER, N_ITEMS)
    model = make_models(cfg, seed=0)[0].to(device)
    layout = store_layout(cfg, kv_dtype)
    host = HostBatcher(layout, pin=True).pack(list(range(b)), store_records(model, layout, b, kv_dtype, device))
    raw = host.tensor.to(device)
    resident = ResidentModel(model, device) if arch == "din" else ResidentZooModel(model, device)
    cand = torch.randint(1, cfg.n_items + 1, (b, 1), device=device)
    flags = torch.zeros(b, dtype=torch.int32, device=device)

    def body() -> torch.Tensor:
        return static_decode(raw, cand, resident=resident, layout=layout, n_users=b, pad_to=layout.max_len,
                             path=FUSED, flags=flags)

    with torch.inference_mode():
        for _ in range(3):
            body()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                body()
            torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        ms = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3 / repeats
        if ms > 0 and e.key and not e.key.startswith(("cudaLaunch", "cudaDevice", "Activity")):
            kernels[e.key[:90]] = round(ms, 5)
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1]))
    return {"arch": arch, "B": b, "L": 1000, "dtype": kv_dtype, "bytes": host.used_bytes,
            "total_ms": round(sum(top.values()), 4), "kernels_ms": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="din,sim,eta,sdim,twin,hstu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for arch in args.archs.split(","):
        row = breakdown(arch, args.batch, args.dtype, args.repeats, device)
        rows.append(row)
        print(f"{arch} B {args.batch} {args.dtype}: {row['total_ms']:.3f} ms of kernels", flush=True)
        for name, ms in list(row["kernels_ms"].items())[:8]:
            print(f"    {ms:8.4f} ms  {name}", flush=True)
    out = args.out or RESULTS / f"zoo_kernel_breakdown_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(device), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
