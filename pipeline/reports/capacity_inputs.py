"""Inputs of the capacity model (pipeline/reports/capacity.py) read from files: a store's lengths, layout and
measured sizes, a histories file's lengths, the serving benchmark's measured bandwidth.

Benchmark results are read from the directory the caller names (``ckv capacity --results-dir``,
default ``benchmarks/results`` of the working directory); the library has no default of its own,
and None means "no results": the reference bandwidth, labelled as such.

Measured store bytes come from ``pipeline.reports.size_report.store_sizes`` (the size report's accounting).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collectivekv.cachestore.store.entry import layout_from_dict
from collectivekv.cachestore.store.lmdb_build import list_parquet_files
from collectivekv.pipeline.reports.capacity import (
    Bandwidth,
    CacheFormat,
    LengthDist,
    StoreCalibration,
    dist_from_lengths,
    dist_from_quantiles,
    parse_quantiles,
    reference_bandwidth,
)
from collectivekv.pipeline.reports.capacity_zoo import ZooFormat

DECODE_GPU = "decode_latency/decode_latency.json"
DECODE_CPU_DRYRUN = "decode_latency/decode_latency_cpu_dryrun.json"
PREFILL_CPU = "prefill/prefill_cpu.json"


def is_store(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "current").exists()


def store_lengths(store: str | os.PathLike) -> LengthDist:
    """The cached lengths of every user of the published version (the Parquet ``length`` column)."""
    from collectivekv.pipeline.store.store_ops import read_manifest

    version, manifest = read_manifest(store)
    files = list_parquet_files(version / "parquet") if (version / "parquet").is_dir() else []
    if not files:  # no Parquet kept: every user at the mean (a point mass), said so
        users, behaviours = manifest["stats"]["users"], manifest["stats"]["behaviours"]
        mean = round(behaviours / users) if users else 0
        return LengthDist(np.array([mean]), np.array([1.0]), str(store),
                          "no Parquet in the store: every user at the mean length", users)
    lengths = np.concatenate([pq.read_table(f, columns=["length"]).column("length").to_numpy() for f in files])
    return dist_from_lengths(lengths, str(store), f"cached lengths of version {version.name}")


def histories_lengths(path: str | os.PathLike) -> LengthDist:
    """History lengths (events per user, before clipping at max_len) of a histories Parquet
    (a file, a directory of files, or a ``ckv data prepare`` dataset directory)."""
    from collectivekv.pipeline.store.verify import history_dataset

    ds = history_dataset(path)
    parts = [pc.list_value_length(b.column(0)).fill_null(0).to_numpy(zero_copy_only=False)
             for b in ds.to_batches(columns=["items"], batch_size=1 << 16)]
    lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return dist_from_lengths(lengths, str(path), "history lengths (all events per user)")


def length_dist(spec: str) -> LengthDist:
    """``--length-dist``: a store root, a histories Parquet file / dir / dataset, or ``mean,p50,p90,max``."""
    if is_store(spec):
        return store_lengths(spec)
    if Path(spec).exists():
        return histories_lengths(spec)
    if "," in spec:
        return dist_from_quantiles(*parse_quantiles(spec))
    raise ValueError(f"--length-dist {spec!r}: not a store, not a histories file, not mean,p50,p90,max")


def store_calibration(store: str | os.PathLike) -> StoreCalibration:
    """The store's measured sizes (pipeline.reports.size_report.store_sizes)."""
    from collectivekv.pipeline.reports.size_report import store_sizes

    s = store_sizes(store)
    b = s["bytes"]
    return StoreCalibration(s["mode"], int(s["users"]), int(b["records"]), int(b["lmdb_disk"]), int(b["parquet"]),
                            str(store))


def store_format(store: str | os.PathLike, fallback_d_attn: int | None = None, **overrides: Any
                 ) -> CacheFormat | ZooFormat:
    """The cache format of a store (dims, dtypes, pool, sharing, max_len), options overriding; a zoo store's
    is its model config (:class:`ZooFormat`). ``fallback_d_attn``: the d_a of a din store whose manifest lacks
    it (e.g. its checkpoint's); without either, such a store is refused.

    A full-KV store gives d_attn and the kv dtype; its CollectiveKV column keeps the defaults
    (d_user 1, pool 10,000, K and V shared) unless overridden."""
    from collectivekv.pipeline.store.store_ops import read_manifest

    _, m = read_manifest(store)
    lay = layout_from_dict(m["layout"])
    g = lay.flat_group
    if lay.arch != "din" or g is None or g.joint or g.int8_user:  # (CacheFormat: separate indices, float parts)
        return zoo_format(store, m, lay, overrides)
    dims = m.get("dims") or {}
    base: dict[str, Any] = {"kv_dtype": lay.kv_dtype, "max_len": lay.max_len}
    if lay.mode == "full":
        base["d_attn"] = g.dk
    else:
        base.update(d_user=dims.get("d_user") or min(g.dk, g.dv), pool_size=lay.pool_size,
                    share_k=g.k_shared, share_v=g.v_shared, index_dtype=lay.idx_dtype or "auto")
        if dims.get("d_attn") or fallback_d_attn:
            base["d_attn"] = dims.get("d_attn") or fallback_d_attn
        elif overrides.get("d_attn") is None:  # the full-KV column's width: never guessed
            raise ValueError(f"{store}: the manifest does not record the model's d_attn (a store of an older "
                             "release): give --d-attn")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return CacheFormat(**base)


def zoo_format(store: str | os.PathLike, manifest: dict, lay: Any, overrides: dict[str, Any]) -> ZooFormat:
    """A zoo store's format: the model config its prefill recorded (windows, groups, keys), K/V at its dtype."""
    from collectivekv.pipeline.reports.size_report import recorded_model

    model = recorded_model(manifest)
    if model is None:
        raise ValueError(f"{store}: a {lay.arch} store whose manifest records no model config (prefill.model_config)")
    unsupported = sorted(k for k, v in overrides.items() if v is not None and k not in ("kv_dtype", "full_kv_dtype"))
    if unsupported:
        raise ValueError(f"{store} is a {lay.arch} store planned from its model config: --"
                         f"{unsupported[0].replace('_', '-')} applies only to din stores with separate router "
                         "indices and float user parts")
    return ZooFormat(model, overrides.get("kv_dtype") or lay.kv_dtype, overrides.get("full_kv_dtype"))


def read_results(results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The benchmark JSONs the report uses from `results_dir`: GPU decode (if any), CPU dry run, CPU
    prefill; each None when absent (all of them when `results_dir` is None)."""
    out: dict[str, Any] = {"dir": None if results_dir is None else str(results_dir)}
    for key, name in (("decode_gpu", DECODE_GPU), ("decode_cpu_dryrun", DECODE_CPU_DRYRUN),
                      ("prefill_cpu", PREFILL_CPU)):
        path = None if results_dir is None else Path(results_dir) / name
        out[key] = json.loads(path.read_text()) if path is not None and path.is_file() else None
        out[key + "_path"] = None if path is None else str(path)
    return out


def measured_bandwidth(results_dir: str | os.PathLike | None = None) -> Bandwidth:
    """``--bandwidth measured``: the pinned copy bandwidth + small-copy latency that
    benchmarks/decode_latency.py measured on the GPU (its ``copy_limits``); falls back to the
    published H100 figure, labelled as such, when that GPU result is missing (or no
    `results_dir` is given)."""
    if results_dir is None:
        return reference_bandwidth("fallback: no benchmark results directory given")
    path = Path(results_dir) / DECODE_GPU
    if not path.is_file():
        return reference_bandwidth(f"fallback: {path} is missing (GPU decode benchmark not run)")
    res = json.loads(path.read_text())
    if res.get("dry_run"):
        return reference_bandwidth(f"fallback: {path} is a dry run, not a GPU measurement")
    lim = res["copy_limits"]
    kind = "pinned" if lim.get("pinned") else "pageable"
    dev = (res.get("machine") or {}).get("gpu") or (res.get("machine") or {}).get("device", "?")
    return Bandwidth(float(lim["floor_gb_per_s"]), float(lim["floor_fixed_ms"]) * 1e3,
                     f"measured by benchmarks/decode_latency.py on {dev} ({path.name}): {kind} H2D "
                     f"{lim['floor_gb_per_s']:.1f} GB/s + {lim['floor_fixed_ms'] * 1e3:.1f} us per copy", measured=True)


def bandwidth(spec: str | None, results_dir: str | os.PathLike | None = None, fixed_us: float | None = None
              ) -> Bandwidth:
    """``--bandwidth``: a number of GB/s, ``measured``, or None (= measured, with its fallback)."""
    if spec is None or spec == "measured":
        bw = measured_bandwidth(results_dir)
    else:
        try:
            gbs = float(spec)
        except ValueError as exc:
            raise ValueError(f"--bandwidth {spec!r}: a number of GB/s or 'measured'") from exc
        if gbs <= 0:
            raise ValueError(f"--bandwidth must be > 0 GB/s, got {spec}")
        bw = Bandwidth(gbs, 20.0, f"given: {gbs:g} GB/s + 20 us per copy (a published H100 small-copy latency)")
    if fixed_us is not None:
        bw = Bandwidth(bw.gb_per_s, fixed_us, bw.source + f"; fixed latency set to {fixed_us:g} us", bw.measured)
    return bw
