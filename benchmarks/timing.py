"""Timing helpers the benchmarks share: the machine a result was measured on (:func:`machine`), medians of
CUDA-event timings on a GPU and of perf_counter on CPU (:func:`timed`), the host→device copy's bandwidth and
fixed latency (:func:`copy_limits`: the PCIe floor of a copied batch), and the request benchmarks' driver
over lengths on one serving core (:func:`sweep_lengths`: ``zero_copy.py``, ``serving_latency.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "device": str(device)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median (and p10/p90) milliseconds of fn() — CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "n": len(times)}


def copy_limits(device: torch.device, pin: bool, quick: bool, warmup: int, repeats: int) -> dict:
    """Host→device bandwidth (large copy, pinned and pageable) and a small copy's fixed latency."""
    big = (64 if quick else 256) << 20
    out = {}
    for name, pinned in (("pinned", pin), ("pageable", False)):
        if name == "pinned" and not pin:
            out[name] = None
            continue
        for size, key in ((big, "large"), (64, "small")):
            src = torch.ones(size, dtype=torch.uint8, pin_memory=pinned)
            dst = torch.empty(size, dtype=torch.uint8, device=device)
            t = timed(lambda src=src, dst=dst: dst.copy_(src, non_blocking=True), device, warmup, repeats)
            out.setdefault(name, {})[key] = {"bytes": size, **t, "gb_per_s": size / t["median_ms"] / 1e6}
            del src, dst
    pinned_stats = out["pinned"] or out["pageable"]
    out["floor_gb_per_s"] = pinned_stats["large"]["gb_per_s"]
    out["floor_fixed_ms"] = pinned_stats["small"]["median_ms"]
    return out


def sweep_lengths(benchmark: str, store_dtype: str, args: argparse.Namespace, device: torch.device,
                  bench_length: Callable[..., dict], plot: Callable[[dict, Path], None]) -> None:
    """The request benchmarks' shared driver (``zero_copy.py``, ``serving_latency.py``): one serving core,
    ``bench_length(length, users, batch_sizes, args, tmp, device)`` per ``args.lengths`` (100,000 users
    at L ≤ 100, else 20,000), the result as JSON at ``args.out`` with its command and machine, and a PNG."""
    if hasattr(os, "sched_setaffinity"):  # one serving core: the fetch is per core
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    info = machine(device)
    print(json.dumps(info), flush=True)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    result: dict = {"benchmark": benchmark, "machine": info, "store_dtype": store_dtype,
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "lengths": {}}
    with tempfile.TemporaryDirectory(prefix=f"ckv-{benchmark}-") as tmp:
        for length in (int(x) for x in args.lengths.split(",")):
            result["lengths"][str(length)] = bench_length(length, 100_000 if length <= 100 else 20_000, batch_sizes,
                                                          args, Path(tmp), device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    plot(result, args.out.with_suffix(".png"))
