"""The paths ``decode_latency.py`` times at one (B, L) (:func:`bench_batch`; every B of one L:
:func:`bench_length`): (a) / (b) full K/V from pinned / pageable host memory (:func:`bench_full`); (c) the
packed batch copied once, then unpacked and decoded per attention path or decoded by the fused kernel
(:func:`bench_collective`), with its breakdown (:func:`bench_breakdown`) and the CUDA-graph paths
(``graph_paths.py``); the best of (c) against (a), (b) and its PCIe floor (:func:`compare_paths`).
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.graph_paths import bench_graph, score_check
from benchmarks.paper_store import N_ITEMS, collective_layout, synthetic_records
from benchmarks.timing import timed
from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import ResidentModel, choose_path, decode, din_cache
from collectivekv.cachestore.decode.fused import fused_available, fused_decode
from collectivekv.cachestore.decode.transfer import KV_TORCH, to_device
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.model.cache import KVCache

EXPERIMENTS = ("c_graph_mapped",)  # timed and checked, not (yet) paths the runtime serves with


def bench_length(resident: ResidentModel, length: int, batch_sizes: list[int], args: argparse.Namespace,
                 device: torch.device, pin: bool, limits: dict, compiled: Callable | None) -> list[dict]:
    b_max = max(batch_sizes)
    layout = collective_layout(resident.cfg.max_len, secrets.token_hex(8), args.store_dtype)
    records = synthetic_records(layout, b_max, length, seed=length)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(1, N_ITEMS + 1, (b_max, 1), generator=g).to(device)
    full_src = torch.randn(2, b_max, length, resident.cfg.d_attn, generator=g).to(KV_TORCH[args.full_kv_dtype])
    rows = []
    for b in batch_sizes:
        row = bench_batch(resident, layout, records, full_src, targets[:b], length, args, device, pin, limits, compiled)
        rows.append(row)
        a_ms = row["a_full_pinned"]["median_ms"] if row["a_full_pinned"] else float("nan")
        g_ms = row["c_graph"].get("median_ms", float("nan"))
        m_ms = row.get("c_graph_mapped", {}).get("median_ms", float("nan"))
        print(f"L={length:5d} B={b:4d}  (a) {a_ms:9.3f}  (b) {row['b_full_pageable']['median_ms']:9.3f}  "
              f"(c) {row['c_ms']:8.3f} [{row['c_best']}]  graph {g_ms:7.3f}  mapped {m_ms:7.3f}  "
              f"floor {row['floor_ms']:7.3f}  "
              f"a/c {row['speedup_vs_a'] or float('nan'):7.1f}x  c/floor {row['c_over_floor']:5.2f}"
              + ("  graph launch/copy/after {launch_ms:.3f}/{copy_ms:.3f}/{after_copy_ms:.3f}".format(**phases)
                 if (phases := row["c_breakdown"].get("graph_phases")) else ""), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_batch(resident: ResidentModel, layout: EntryLayout, records: list[bytes], full_src: torch.Tensor,
                targets: torch.Tensor, length: int, args: argparse.Namespace, device: torch.device, pin: bool,
                limits: dict, compiled: Callable | None) -> dict:
    """Paths (a), (b), (c) for one (B, L); B = targets.shape[0]."""
    b = targets.shape[0]
    row: dict = {"L": length, "B": b}
    lengths = torch.full((b,), length, dtype=torch.int64, device=device)
    row.update(bench_full(resident, full_src, targets, lengths, args, device, pin))
    # (c): packed records in a pinned host buffer -> one copy -> unpack -> decode
    host = HostBatcher(layout, pin=pin, n_buffers=1).pack(np.arange(b), records[:b])
    row["c_bytes"] = host.used_bytes
    row["floor_ms"] = host.used_bytes / limits["floor_gb_per_s"] / 1e6 + limits["floor_fixed_ms"]
    fused = fused_available(device)
    bench_collective(row, resident, layout, host, targets, args, device, compiled, fused)
    want = bench_breakdown(row, resident, layout, host, targets, args, device, fused)
    bench_graph(row, resident, layout, host, targets, want, args, device)
    compare_paths(row)
    return row


def bench_collective(row: dict, resident: ResidentModel, layout: EntryLayout, host, targets: torch.Tensor,
                     args: argparse.Namespace, device: torch.device, compiled: Callable | None, fused: bool) -> None:
    """(c) end to end from the pinned batch ``host``, one copy each time: c_poolscore, c_gather (unpack +
    decode), c_poolscore_compiled (with ``compiled``), c_fused (the fused kernel, where ``fused``)."""
    b = targets.shape[0]

    def collective_path(path: str, fn: Callable) -> torch.Tensor:
        dev, _ = to_device(host, device)
        return fn(resident, din_cache(dev.unpack()), targets, path)

    def fused_path() -> torch.Tensor:
        dev, _ = to_device(host, device)
        return fused_decode(resident, dev.raw, layout, b, targets, config=args.fused)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "poolscore": lambda: collective_path("poolscore", decode), "gather": lambda: collective_path("gather", decode)}
    if compiled is not None:
        variants["poolscore_compiled"] = lambda: collective_path("poolscore", compiled)
    if fused:
        variants["fused"] = fused_path
    for name, fn in variants.items():
        try:
            row[f"c_{name}"] = timed(fn, device, args.warmup, args.repeats)
        except Exception as exc:  # e.g. a compile failure must not lose the other numbers
            row[f"c_{name}"] = {"error": repr(exc)[:500]}


def bench_breakdown(row: dict, resident: ResidentModel, layout: EntryLayout, host, targets: torch.Tensor,
                    args: argparse.Namespace, device: torch.device, fused: bool) -> torch.Tensor:
    """c_auto_path and c_breakdown of (c) (copy, unpack, decode per path; the fused decode where ``fused``,
    its scores checked); returns c_poolscore's scores, which every other (c) path is checked against."""
    b = targets.shape[0]
    dev, cost = to_device(host, device)
    cache = din_cache(dev.unpack())
    row["c_auto_path"] = choose_path(cache, 1, resident)
    row["c_breakdown"] = {
        "copy": timed(lambda: to_device(host, device), device, args.warmup, args.repeats),
        "copy_event_ms": cost.ms,
        "unpack": timed(lambda: din_cache(dev.unpack()), device, args.warmup, args.repeats),
        **{f"decode_{p}": timed(lambda p=p: decode(resident, cache, targets, p), device, args.warmup,
                                args.repeats) for p in ("poolscore", "gather")},
    }
    want = decode(resident, cache, targets, "poolscore")  # the scores every other (c) path is checked against
    if fused:  # the fused decode (q + kernel + MLP) on the device batch
        row["c_breakdown"]["decode_fused"] = timed(
            lambda: fused_decode(resident, dev.raw, layout, b, targets, config=args.fused), device, args.warmup,
            args.repeats)
        row["c_fused_max_abs_diff"], error = score_check(
            fused_decode(resident, dev.raw, layout, b, targets, config=args.fused), want, args.score_tol)
        if error:
            row["c_fused"] = {"error": error}
    return want


def compare_paths(row: dict) -> None:
    """c_best and c_ms (the fastest (c) path the runtime serves with), its speed-ups over (a) and (b) and
    its ratio to the PCIe floor; the same for c_graph."""
    ok = {k: v["median_ms"] for k, v in row.items()  # the paths the runtime serves with (not the experiment)
          if k.startswith("c_") and k not in EXPERIMENTS and isinstance(v, dict) and "median_ms" in v}
    row["c_best"] = min(ok, key=ok.get)
    row["c_ms"] = ok[row["c_best"]]
    a_ms = row["a_full_pinned"]["median_ms"] if row["a_full_pinned"] else None
    row["speedup_vs_a"] = a_ms / row["c_ms"] if a_ms else None
    row["speedup_vs_b"] = row["b_full_pageable"]["median_ms"] / row["c_ms"]
    row["c_over_floor"] = row["c_ms"] / row["floor_ms"]
    g_ms = row["c_graph"].get("median_ms")
    row["c_graph_speedup_vs_a"] = a_ms / g_ms if a_ms and g_ms else None
    row["c_graph_over_floor"] = g_ms / row["floor_ms"] if g_ms else None


def bench_full(resident: ResidentModel, full_src: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
               args: argparse.Namespace, device: torch.device, pin: bool) -> dict:
    """(a) / (b): full K/V in one contiguous host tensor (2, B, L, d_a), one copy, attention + MLP.
    Its buffers (up to 2 x 1 GiB host + 1 GiB device) are freed on return."""
    b = targets.shape[0]
    pageable = full_src[:, :b].contiguous()
    dev_full = torch.empty_like(pageable, device=device)

    def full_path(host: torch.Tensor) -> torch.Tensor:
        dev_full.copy_(host, non_blocking=True)
        return decode(resident, KVCache(dev_full[0], dev_full[1], None, None, lengths), targets)

    out: dict = {"full_bytes": pageable.numel() * pageable.element_size(), "a_full_pinned": None}
    if pin:
        pinned = pageable.pin_memory()
        out["a_full_pinned"] = timed(lambda: full_path(pinned), device, args.warmup, args.repeats_full)
    out["b_full_pageable"] = timed(lambda: full_path(pageable), device, args.warmup, args.repeats_full)
    return out
