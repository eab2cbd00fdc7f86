"""The fused collective-attention kernel alone (cachestore/decode/fused.py) at the paper's serving shape.

    python benchmarks/fused_kernel.py            # GPU with Triton -> benchmarks/results/fused_kernel/fused_kernel.json

For B = 512 users with full histories (L = 1000 and 50), d_a 256, 8 heads, d_u 1, pool 10,000: times
``fused_attention`` (the kernel only: q given, packed batch already on the device) for each
(BLOCK_L, num_warps, heads per program, pipelining stages, history split, pool dtype, batch source:
the device copy, or the pinned host batch read over PCIe by the kernel) in a small grid,
with CUDA events after warm-up (median of --repeats), next to
the eager unpack + poolscore / gather attention it replaces on the same batch (also attention only).
Reports the bytes the kernel must read (user parts + indices from the batch, two dh-wide fp32 pool rows
per behaviour and head, mostly L2 hits) and the effective rate, and the pool-gather floor: a kernel
doing only those pool-row reads (best of a small grid), the least time a gather kernel needs; checks
every configuration's output against the gather reference (max abs diff). Each timing is one Python
call between two CUDA events, so it includes that call's launch cost on the CPU, which a graph replay
does not pay: the defaults are chosen inside the serving graph instead (``decode_latency.py
--compare-launch``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_store import PAPER, collective_layout, paper_model, synthetic_records  # noqa: E402
from benchmarks.timing import machine, timed  # noqa: E402
from collectivekv.cachestore.decode.batch import HostBatcher  # noqa: E402
from collectivekv.cachestore.decode.decode import din_cache, pool_score_attention  # noqa: E402
from collectivekv.cachestore.decode.fused import FusedConfig, fused_attention  # noqa: E402
from collectivekv.cachestore.decode.transfer import to_device  # noqa: E402

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_floor_kernel(kidx_ptr, vidx_ptr, pool_k_ptr, pool_v_ptr, out_ptr, L, D_A: tl.constexpr,
                             W: tl.constexpr, BLOCK_L: tl.constexpr, SEG: tl.constexpr):
        """The fused kernel's pool reads and nothing else: program (b, g, part) sums the W-wide column
        group g of P_k[k_idx[b, l]] + P_v[v_idx[b, l]] over its part's behaviours (no user part, no
        softmax), so its time is what the same gathers cost at best."""
        b, g, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = g * W + tl.arange(0, W)  # (W,)
        acc = tl.zeros([W], dtype=tl.float32)
        for l0 in range(part * SEG, tl.minimum(L, part * SEG + SEG), BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
            m = ls < L
            ik = tl.load(kidx_ptr + b * L + ls, mask=m, other=0)
            iv = tl.load(vidx_ptr + b * L + ls, mask=m, other=0)
            k = tl.load(pool_k_ptr + ik[:, None] * D_A + cols[None, :], mask=m[:, None], other=0.0)
            v = tl.load(pool_v_ptr + iv[:, None] * D_A + cols[None, :], mask=m[:, None], other=0.0)
            acc += tl.sum(k.to(tl.float32) + v.to(tl.float32), axis=0)
        tl.store(out_ptr + (b * tl.num_programs(2) + part) * D_A + cols, acc)
except ImportError:  # pragma: no cover - the script needs a GPU with Triton anyway
    triton = None


def gather_floor(users: int, length: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Best time of :func:`_gather_floor_kernel` over a small launch grid, per pool dtype: the floor of
    the fused kernel's pool-row reads (uniform indices over the pool, as the synthetic records)."""
    d_a, pool = PAPER["d_attn"], PAPER["pool_size"]
    g = torch.Generator(device="cpu").manual_seed(3)
    kidx = torch.randint(0, pool, (users, length), generator=g, dtype=torch.int32).to(device)  # (B, L)
    vidx = torch.randint(0, pool, (users, length), generator=g, dtype=torch.int32).to(device)  # (B, L)
    out: dict = {}
    for name in args.pool_dtypes.split(","):
        dtype = getattr(torch, name)
        pk = torch.randn(pool, d_a, generator=g).to(device=device, dtype=dtype)  # (M, d_a)
        pv = torch.randn(pool, d_a, generator=g).to(device=device, dtype=dtype)  # (M, d_a)
        read = 2 * users * length * d_a * dtype.itemsize  # two pool rows per behaviour
        want = (pk[kidx].float() + pv[vidx].float()).sum(1)  # (B, L, d_a) -> (B, d_a), checks every setting
        best = None
        for width, block, warps, parts in itertools.product((64, 256), (32, 64), (2, 4), (1, 4)):
            seg = -(-length // (parts * block)) * block
            acc = torch.empty(users * parts, d_a, device=device)

            run = functools.partial(_gather_floor_kernel[(users, d_a // width, parts)], kidx, vidx, pk, pv, acc,
                                    length, D_A=d_a, W=width, BLOCK_L=block, SEG=seg, num_warps=warps)
            t = timed(run, device, args.warmup, args.repeats)["median_ms"]
            got = acc.view(users, parts, d_a).sum(1)  # (B, d_a)
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-2):
                raise AssertionError(f"gather floor kernel wrong ({width}, {block}, {warps}, {parts})")
            if best is None or t < best["median_ms"]:
                best = {"median_ms": t, "width": width, "block_l": block, "num_warps": warps, "parts": parts}
        out[name] = {**best, "pool_bytes_read": read, "gb_per_s": read / best["median_ms"] / 1e6}
        print(f"L={length} B={users} pool-gather floor {name}: {best['median_ms']:.4f} ms "
              f"({out[name]['gb_per_s']:.0f} GB/s)", flush=True)
    return out


def bench_length(length: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Every FusedConfig of the grid and the eager attention paths at one history length."""
    resident = paper_model(length, device)
    layout = collective_layout(length, "0123456789abcdef")
    host = HostBatcher(layout, pin=True, n_buffers=1).pack(
        np.arange(args.users), synthetic_records(layout, args.users, length, seed=7))
    dev, _ = to_device(host, device)
    half = din_cache(dev.unpack())
    cache = dataclasses.replace(half, k_user=half.k_user.float(), v_user=half.v_user.float())  # as decode casts
    torch.manual_seed(0)
    q = torch.randn(args.users, 1, PAPER["d_attn"], device=device)  # (B, C=1, d_a)
    heads, dh = PAPER["n_heads"], PAPER["d_attn"] // PAPER["n_heads"]
    pool_bytes = args.users * length * heads * 2 * dh * 4  # two fp32 dh-wide pool slices per (behaviour, head)

    def ms(fn) -> float:
        return timed(fn, device, args.warmup, args.repeats)["median_ms"]

    with torch.inference_mode():
        want = resident.model.attend(q, cache)  # (B, 1, d_a): the gather reference
        row = {"L": length, "B": args.users, "batch_bytes": host.used_bytes, "pool_row_bytes": pool_bytes,
               "eager_unpack_ms": ms(lambda: din_cache(dev.unpack())),
               "eager_gather_attention_ms": ms(lambda: resident.model.attend(q, cache)),
               "eager_poolscore_attention_ms": ms(lambda: pool_score_attention(resident, q, cache))}
        configs = []
        stages = [None if x == "default" else int(x) for x in args.stages.split(",")]
        splits = [None if x == "auto" else int(x) for x in args.splits.split(",")]
        grid = itertools.product([int(x) for x in args.blocks.split(",")], [int(x) for x in args.warps.split(",")],
                                 [int(x) for x in args.heads.split(",")], stages, splits, args.pool_dtypes.split(","),
                                 args.sources.split(","))
        for block, warps, hpp, stage, split, pool, source in grid:
            config = FusedConfig(block_l=block, num_warps=warps, heads_per_program=hpp, num_stages=stage,
                                 split_l=split, pool_dtype=pool)

            raw = dev.raw if source == "device" else host.tensor  # mapped: the pinned host batch, over PCIe

            def run(config: FusedConfig = config, raw: torch.Tensor = raw) -> torch.Tensor:
                return fused_attention(raw, q, resident, layout, args.users, config=config)
            try:
                diff = float((run() - want).abs().max())
                t = timed(run, device, args.warmup, args.repeats)
            except Exception as exc:  # e.g. out of registers/shared memory for a large tile
                print(f"{config}: {exc!r}"[:300], flush=True)
                continue
            pool_read = pool_bytes // (1 if pool == "float32" else 2)
            configs.append({**dataclasses.asdict(config), "source": source, "median_ms": t["median_ms"],
                            "p90_ms": t["p90_ms"], "max_abs_diff": diff,
                            "pool_gb_per_s": pool_read / t["median_ms"] / 1e6})
            print(f"L={length} B={args.users} block {block:4d} warps {warps} heads {hpp} stages {stage} "
                  f"split {split} {pool} {source}: {t['median_ms']:.4f} ms (diff {diff:.2e})", flush=True)
    row["configs"] = configs
    row["pool_gather_floor"] = gather_floor(args.users, length, args, device) if triton is not None else None
    exact = [c for c in configs if c["pool_dtype"] == "float32"]
    exact = [c for c in exact if c["source"] == "device"]
    row["best_fp32_pools"] = min(exact, key=lambda c: c["median_ms"]) if exact else None
    row["best_any_pools"] = min(configs, key=lambda c: c["median_ms"]) if configs else None
    print(json.dumps({k: v for k, v in row.items() if k != "configs"}, indent=1), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=512)
    p.add_argument("--lengths", default="1000,50")
    p.add_argument("--blocks", default="16,32,64")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--heads", default="1,2,8", help="heads per program")
    p.add_argument("--stages", default="default", help="num_stages values ('default': Triton's)")
    p.add_argument("--splits", default="auto", help="split_l values ('auto': split_parts picks)")
    p.add_argument("--pool-dtypes", default="float32,float16")
    p.add_argument("--sources", default="device",
                   help="where the kernel reads the packed batch: device (copied first) and/or mapped "
                        "(pinned host memory read over PCIe by the kernel: zero-copy; then the time includes "
                        "the transfer)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fused_kernel/fused_kernel.json")
    args = p.parse_args()
    device = torch.device("cuda")
    rows = [bench_length(int(x), args, device) for x in args.lengths.split(",")]
    out = {"benchmark": "fused_kernel", "machine": machine(device), "command": " ".join(sys.argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
