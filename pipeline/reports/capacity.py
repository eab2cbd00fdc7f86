"""Capacity model: storage, GPU memory and host→GPU transfer of a user base, full KV vs CollectiveKV.

Pure functions (numpy + the record / cache arithmetic; no file or network I/O). ``ckv capacity``
(jobs/capacity.py) and the HTML report feed them inputs read by :mod:`pipeline.reports.capacity_inputs`.
docs/capacity.md explains every number; the arithmetic:

- **per behaviour**: CollectiveKV = user K and V parts at the kv dtype + one router index per shared
  side (``model.cache_spec.bytes_per_behaviour`` of the din entry; the index is uint16 while the pool
  has ≤ 65,536 rows unless ``index_dtype`` says otherwise); full KV = ``2·d_a·kv_size``.
- **per user**: a record = 32-byte header (``cachestore.store.record.HEADER_SIZE``) + n × per behaviour
  (``EntryLayout.record_size`` of the din entry ``model.cache_spec.entry_parts``), n = min(history
  length, max_len), averaged over the length distribution. Payload excludes the header.
- **LMDB on disk**: an exact page model of the store builder's LMDB (4 KiB pages, 16-byte page
  header; a leaf node = 8-byte node header + 8-byte key + value, rounded to even, + a 2-byte slot;
  values whose node exceeds LMDB's ``nodemax`` (2,038 B at 4 KiB) go to ``ceil((16 + size)/4096)``
  overflow pages and leave a 24-byte node; keys arrive sorted with ``MDB_APPEND`` so leaves are
  filled greedily in key order; branch pages above; 2 meta pages). It reproduces the builder's
  data.mdb byte for byte when given the store's record sizes in key order (docs/capacity.md);
  for a length *distribution* the sizes are a stratified, seeded sample of it.
- **GPU-resident pool**: ``(k_shared + v_shared) × pool × (d_a − d_u) × 4`` (fp32, as served).
- **a request batch** moves the serving layout of ``cachestore/decode/batch.py`` in one copy:
  ``16·B + zero block + Σ align8(record)``; time = bytes / bandwidth + a fixed latency.
- **users that fit**: host memory / LMDB bytes per user (the page cache holding the store);
- **shards**: a sharded store (``ckv prefill --shards N``) across hosts (each shard's LMDB in one host's memory) or
  GPUs (records resident: (GPU memory − pool) / batch bytes per user): users / users that fit, rounded up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.record import HEADER_SIZE, IDX_DTYPES, KV_DTYPES
from collectivekv.model.cache_spec import bytes_per_behaviour, entry_parts, index_itemsize, store_config
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.reports.lmdb_pages import LMDB_META_PAGES, LMDB_PAGE, branch_pages, lmdb_pages

BATCH_INDEX_BYTES = 16  # offsets + lengths, int64 each, per user in a batch (cachestore/decode/batch.py)
SAMPLE_USERS = 200_000  # records simulated for the page model of a length distribution
Z90 = 1.2815515655446004  # standard normal 90% quantile
_DUMMY_VERSION = "0" * 16
if TYPE_CHECKING:
    from collectivekv.pipeline.reports.capacity_zoo import ZooFormat

# a published H100 figure (pinned host→device): the fallback when no GPU run of benchmarks/decode_latency.py is given
REFERENCE_H2D_GB_S = (51.0, 55.0)
REFERENCE_H2D_FIXED_US = 20.0


# ----------------------------------------------------------------------------- length distribution
@dataclass(frozen=True)
class LengthDist:
    """A distribution of history lengths (behaviours per user) as a pmf over distinct lengths."""

    lengths: np.ndarray  # (K,) int64, ascending, distinct
    probs: np.ndarray  # (K,) float64, sums to 1
    source: str  # where it came from (store path, file, "mean,p50,p90,max")
    note: str = ""  # how it was obtained (fit, truncation, clipping)
    observed_users: int | None = None  # users it was measured on (store / file)

    def __post_init__(self) -> None:
        if self.lengths.ndim != 1 or self.lengths.shape != self.probs.shape or not len(self.lengths):
            raise ValueError("LengthDist needs equal, non-empty 1-d lengths and probs")
        if np.any(self.lengths < 0) or np.any(np.diff(self.lengths) <= 0):
            raise ValueError("LengthDist lengths must be non-negative and strictly increasing")
        if np.any(self.probs < 0) or not math.isclose(float(self.probs.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("LengthDist probs must be non-negative and sum to 1")

    @property
    def mean(self) -> float:
        return float(np.dot(self.lengths, self.probs))

    @property
    def max(self) -> int:
        return int(self.lengths[self.probs > 0][-1])

    def quantile(self, q: float) -> int:
        """Smallest length L with P(n ≤ L) ≥ q."""
        cdf = np.cumsum(self.probs)
        return int(self.lengths[min(int(np.searchsorted(cdf, q - 1e-12)), len(cdf) - 1)])

    def expect(self, values: np.ndarray) -> float:
        """E[f(n)] for f given as its values at ``self.lengths``."""
        return float(np.dot(np.asarray(values, dtype=np.float64), self.probs))

    def clip(self, max_len: int | None) -> LengthDist:
        """The cached lengths min(n, max_len) (a cache holds the last max_len behaviours)."""
        if max_len is None or self.max <= max_len:
            return self
        clipped = np.minimum(self.lengths, max_len)
        values, inverse = np.unique(clipped, return_inverse=True)
        probs = np.bincount(inverse, weights=self.probs, minlength=len(values))
        mass = float(self.probs[self.lengths > max_len].sum())
        note = (self.note + "; " if self.note else "") + f"clipped at max_len {max_len} ({mass:.1%} of users above)"
        return LengthDist(values.astype(np.int64), probs / probs.sum(), self.source, note, self.observed_users)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n lengths at the distribution's quantiles (i + ½)/n, in a seeded random order.

        Stratified: for an empirical distribution of exactly n users this returns their lengths.
        """
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        cdf = np.cumsum(self.probs)
        cdf[-1] = 1.0
        u = (np.arange(n, dtype=np.float64) + 0.5) / n
        out = self.lengths[np.minimum(np.searchsorted(cdf, u, side="left"), len(cdf) - 1)]
        return np.random.default_rng(seed).permutation(out)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "note": self.note, "observed_users": self.observed_users,
                "mean": self.mean, "p50": self.quantile(0.5), "p90": self.quantile(0.9),
                "p99": self.quantile(0.99), "max": self.max}


def dist_from_lengths(lengths: np.ndarray, source: str, note: str = "") -> LengthDist:
    """The empirical distribution of observed lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        raise ValueError(f"{source}: no users to take a length distribution from")
    values, counts = np.unique(lengths, return_counts=True)
    return LengthDist(values, counts / counts.sum(), source, note, int(len(lengths)))


def parse_quantiles(text: str) -> tuple[float, float, float, int]:
    """``"mean,p50,p90,max"`` → numbers; ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4:
        raise ValueError(f"length distribution {text!r}: expected mean,p50,p90,max (4 numbers)")
    try:
        mean, p50, p90, mx = (float(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"length distribution {text!r}: not numbers ({exc})") from exc
    if not (mean > 0 and 0 < p50 <= p90 <= mx) or mx != int(mx):
        raise ValueError(f"length distribution {text!r}: need mean > 0, 0 < p50 <= p90 <= max, integer max")
    return mean, p50, p90, int(mx)


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * (1.0 + erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)).astype(np.float64))


def dist_from_quantiles(mean: float, p50: float, p90: float, max_len: int, source: str | None = None
                        ) -> LengthDist:
    """A log-normal matched to the median and the 90th percentile, discretised to integer lengths
    1..max (P(n) = F(n + ½) − F(n − ½), n = 1 taking all mass below 1.5) and truncated at max
    (renormalised). The given mean is not a fit parameter: the note compares it with the fit's."""
    if max_len > 5_000_000:
        raise ValueError(f"max length {max_len} is too large for the discretised fit (<= 5,000,000)")
    mu = math.log(p50)
    sigma = math.log(p90 / p50) / Z90
    n = np.arange(1, max_len + 1, dtype=np.float64)
    if sigma <= 0:
        probs = (n == round(p50)).astype(np.float64)
    else:
        cdf = _norm_cdf((np.log(n + 0.5) - mu) / sigma)  # F(n + 1/2)
        probs = np.diff(np.concatenate([[0.0], cdf]))  # mass above max + 1/2 dropped: truncation
        if probs.sum() <= 0:
            raise ValueError(f"log-normal(p50 {p50}, p90 {p90}) has no mass in 1..{max_len}")
        probs /= probs.sum()
    dist = LengthDist(n.astype(np.int64), probs, source or f"{mean:g},{p50:g},{p90:g},{max_len}")
    fit_mean = dist.mean
    note = (f"log-normal fitted to p50 {p50:g} and p90 {p90:g} (mu {mu:.3f}, sigma {sigma:.3f}), integer lengths "
            f"1..{max_len}, truncated at max {max_len}; its mean {fit_mean:.1f} vs the given mean {mean:g} "
            f"({fit_mean / mean - 1:+.1%})")
    return LengthDist(dist.lengths, dist.probs, dist.source, note)


# ------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class CacheFormat:
    """What the per-user cache looks like (one of the two columns of the capacity table)."""

    d_attn: int = 256
    d_user: int = 1
    pool_size: int = 10_000
    kv_dtype: str = "float16"
    index_dtype: str = "auto"  # auto (uint16 while pool ≤ 65,536, else int32), uint16, int32
    share_k: bool = True
    share_v: bool = True
    max_len: int | None = None  # cached behaviours per user (None: the distribution as given)
    full_kv_dtype: str | None = None  # dtype of the full-KV column (None: kv_dtype)

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv dtype must be one of {sorted(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.full_kv_dtype is not None and self.full_kv_dtype not in KV_DTYPES:
            raise ValueError(f"full kv dtype must be one of {sorted(KV_DTYPES)}, got {self.full_kv_dtype!r}")
        if self.index_dtype != "auto" and self.index_dtype not in IDX_DTYPES:
            raise ValueError(f"index dtype must be auto or one of {sorted(IDX_DTYPES)}, got {self.index_dtype!r}")
        if not 1 <= self.d_user < self.d_attn:
            raise ValueError(f"need 1 <= d_user < d_attn, got d_user {self.d_user}, d_attn {self.d_attn}")
        if self.pool_size < 1:
            raise ValueError(f"pool size must be >= 1, got {self.pool_size}")
        if not (self.share_k or self.share_v):
            raise ValueError("CollectiveKV needs K or V (or both) shared")
        if self.index_dtype == "uint16" and self.pool_size > 65_536:
            raise ValueError(f"a pool of {self.pool_size} rows needs int32 indices")

    @property
    def idx_dtype(self) -> str:
        if self.index_dtype != "auto":
            return self.index_dtype
        from collectivekv.model.cache_spec import index_dtype

        return index_dtype(self.pool_size)

    def model_config(self) -> ModelConfig:
        """The din config of this format (one behaviour window: per-behaviour arithmetic only)."""
        return ModelConfig(n_items=1, d_attn=self.d_attn, n_heads=1, max_len=1, kv_mode="collective",
                           collective=CollectiveConfig(d_user=self.d_user, pool_size=self.pool_size,
                                                       share_k=self.share_k, share_v=self.share_v))

    def layouts(self) -> dict[str, EntryLayout]:
        """{"full": full-KV layout, "collective": CollectiveKV layout} (records as the store writes them: the
        din entry of ``model.cache_spec``, window ``max_len``)."""
        ml = self.max_len if self.max_len is not None else 0xFFFFFFFF
        out = {}
        for mode, kv_dtype, idx in (("full", self.full_kv_dtype or self.kv_dtype, None),
                                    ("collective", self.kv_dtype, self.idx_dtype)):
            parts = tuple(dataclasses.replace(p, cap=ml) for p in entry_parts(store_config(self.model_config(), mode)))
            out[mode] = EntryLayout("din", mode, kv_dtype, idx, self.pool_size if idx else 0, ml, _DUMMY_VERSION,
                                    parts)
        return out

    def collective_bytes_per_behaviour(self) -> int:
        """model.cache_spec's arithmetic (the CR's numerator), checked against the record layout."""
        kv = KV_DTYPES[self.kv_dtype][1].itemsize
        per = int(bytes_per_behaviour(self.model_config(), kv))
        shared = int(self.share_k) + int(self.share_v)
        per += shared * (IDX_DTYPES[self.idx_dtype][1].itemsize - index_itemsize(self.pool_size))
        assert per == self.layouts()["collective"].record_size(1) - HEADER_SIZE, "record layout != model.cache_spec"
        return per

    def pool_bytes(self) -> int:
        """GPU-resident global pools: (k_shared + v_shared) × pool × (d_a − d_u) × 4 bytes (fp32)."""
        return (int(self.share_k) + int(self.share_v)) * self.pool_size * (self.d_attn - self.d_user) * 4


@dataclass(frozen=True)
class Bandwidth:
    """Host→GPU copy: GB/s (1e9 B/s) and a fixed per-copy latency, with where they come from."""

    gb_per_s: float
    fixed_us: float
    source: str
    measured: bool = False

    def transfer_ms(self, nbytes: float) -> float:
        return nbytes / (self.gb_per_s * 1e9) * 1e3 + self.fixed_us / 1e3


def reference_bandwidth(note: str = "") -> Bandwidth:
    """The published H100 figure: pinned H2D 51–55 GB/s (the low end is used), ~20 µs per copy."""
    lo, hi = REFERENCE_H2D_GB_S
    src = (f"published H100 figure (not measured by this project's benchmark): pinned H2D {lo:g}-{hi:g} GB/s, "
           f"using {lo:g} GB/s + {REFERENCE_H2D_FIXED_US:g} us per copy")
    return Bandwidth(lo, REFERENCE_H2D_FIXED_US, src + (f"; {note}" if note else ""), measured=False)


@dataclass(frozen=True)
class Budgets:
    host_mem_gib: float = 512.0
    gpu_mem_gib: float = 80.0


@dataclass(frozen=True)
class StoreCalibration:
    """What a real store measured (``pipeline.reports.size_report.store_sizes``), for the matching column."""

    mode: str  # the store's layout mode: its numbers calibrate that column
    users: int
    records: int
    lmdb_disk: int
    parquet: int
    path: str = ""

    @property
    def lmdb_overhead(self) -> float:
        return self.lmdb_disk / self.records if self.records else float("nan")

    @property
    def parquet_ratio(self) -> float:
        return self.parquet / self.records if self.records else float("nan")


def lmdb_bytes_for(layout: EntryLayout, dist: LengthDist, users: int, *, sample_users: int = SAMPLE_USERS,
                   seed: int = 0) -> dict[str, float]:
    """Expected data.mdb bytes of ``users`` users drawn from ``dist`` (page model on a stratified sample
    of min(users, sample_users) records in random order; leaf and overflow pages scaled to ``users``)."""
    m = min(users, sample_users)
    lengths = dist.sample(m, seed)
    p = lmdb_pages(layout.record_sizes(lengths))
    scale = users / m if m else 0.0
    leaf, overflow = p["leaf"] * scale, p["overflow"] * scale
    pages = leaf + overflow + branch_pages(leaf) + LMDB_META_PAGES
    return {"bytes": pages * LMDB_PAGE, "leaf_pages": leaf, "overflow_pages": overflow, "sampled_users": m}


# ---------------------------------------------------------------------------------------- capacity
def full_fp32_window(layout: EntryLayout, d_attn: int) -> int:
    """The CR denominator of a full window: every group's K and V rows at d_a values of fp32."""
    return sum(g.cap * ((d_attn if g.dk else 0) + d_attn) * 4 for g in layout.groups)


def _align8(x: np.ndarray) -> np.ndarray:
    return (x + 7) // 8 * 8


def zero_block(layout: EntryLayout) -> int:
    """The batch's zero block (cachestore.decode.batch.zero_block_bytes, without importing torch)."""
    return -(-max(8, *layout.row_bytes) // 8) * 8


def layout_summary(layout: EntryLayout) -> dict[str, Any]:
    """What a layout caches: mode, dtypes, the first group's dk / dv and sharing, pool size, arch and parts."""
    g = layout.groups[0]
    return {"arch": layout.arch, "mode": layout.mode, "kv_dtype": layout.kv_dtype, "idx_dtype": layout.idx_dtype,
            "dk": g.dk, "dv": g.dv, "k_shared": g.k_shared, "v_shared": g.v_shared, "pool_size": layout.pool_size,
            "user_dtype": "int8" if g.int8_user else layout.kv_dtype, "groups": len(layout.groups),
            "indices": 1 if g.joint else g.k_shared + g.v_shared, "parts": len(layout.parts)}


def format_capacity(layout: EntryLayout, dist: LengthDist, users: int, batch: int, bandwidth: Bandwidth,
                    budgets: Budgets, pool_bytes: int, d_attn: int, calibration: StoreCalibration | None = None,
                    *, seed: int = 0) -> dict[str, Any]:
    """One column of the capacity table: one cache layout for ``users`` users of ``dist``."""
    window = max(p.cap for p in layout.parts)
    per_b = (layout.record_size(window) - HEADER_SIZE) / window  # din: exactly the bytes of one behaviour
    per_b = int(per_b) if per_b == int(per_b) else round(per_b, 2)
    rec = layout.record_sizes(dist.lengths)  # (K,) record size per distinct length
    payload_u = dist.expect(rec) - HEADER_SIZE
    record_u = float(HEADER_SIZE + payload_u)
    lm = lmdb_bytes_for(layout, dist, users, seed=seed)
    lmdb_u = lm["bytes"] / users if users else 0.0
    z = zero_block(layout)
    batch_u = dist.expect(_align8(rec)) + BATCH_INDEX_BYTES
    batch_mean = batch * batch_u + z
    batch_max = batch * (int(_align8(np.array(layout.record_size(dist.max)))) + BATCH_INDEX_BYTES) + z
    host, gpu = budgets.host_mem_gib * 2**30, budgets.gpu_mem_gib * 2**30
    out: dict[str, Any] = {
        "layout": layout_summary(layout),
        "bytes_per_behaviour": per_b,
        "cr_vs_full_fp32": (layout.record_size(window) - HEADER_SIZE) / full_fp32_window(layout, d_attn),
        "per_user": {"payload": payload_u, "records": record_u, "lmdb_disk": lmdb_u, "batch": batch_u},
        "total": {"payload": users * payload_u, "records": users * record_u, "lmdb_disk": lm["bytes"],
                  "record_headers": users * HEADER_SIZE},
        "lmdb_model": {k: lm[k] for k in ("leaf_pages", "overflow_pages", "sampled_users")},
        "gpu_pool_bytes": pool_bytes,
        "batch": {"users": batch, "bytes_mean": batch_mean, "ms_mean": bandwidth.transfer_ms(batch_mean),
                  "bytes_all_at_max": batch_max, "ms_all_at_max": bandwidth.transfer_ms(batch_max)},
        "fits": {"host_users": int(host // lmdb_u) if lmdb_u else None,
                 "gpu_users": (int(max(0.0, gpu - pool_bytes) // batch_u) if batch_u else None),
                 "pool_fits_gpu": pool_bytes <= gpu},
    }
    fits = out["fits"]  # shards: users / users per host or GPU, rounded up (the shard function spreads users evenly)
    out["shards"] = {k: -(-users // fits[f]) if fits[f] else None for k, f in (("hosts", "host_users"),
                                                                              ("gpus", "gpu_users"))}
    if calibration is not None and calibration.mode == layout.mode:
        out["total"]["lmdb_disk_measured_overhead"] = out["total"]["records"] * calibration.lmdb_overhead
        out["total"]["parquet_measured_ratio"] = out["total"]["records"] * calibration.parquet_ratio
        out["calibration"] = {"store": calibration.path, "users": calibration.users,
                              "lmdb_overhead": calibration.lmdb_overhead, "parquet_ratio": calibration.parquet_ratio}
    return out


def capacity_plan(users: int, dist: LengthDist, fmt: CacheFormat | ZooFormat, *, batch: int = 512,
                  bandwidth: Bandwidth | None = None, budgets: Budgets | None = None,
                  calibration: StoreCalibration | None = None, seed: int = 0) -> dict[str, Any]:
    """Full KV vs CollectiveKV for ``users`` users whose history lengths follow ``dist`` (JSON-ready)."""
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    bandwidth = bandwidth or reference_bandwidth()
    budgets = budgets or Budgets()
    cached = dist.clip(fmt.max_len)
    lay = fmt.layouts()
    fmt.collective_bytes_per_behaviour()  # the model.cache cross-check
    cols = {name: format_capacity(lay[name], cached, users, batch, bandwidth, budgets,
                                  fmt.pool_bytes() if name == "collective" else 0, fmt.d_attn, calibration,
                                  seed=seed)
            for name in ("full", "collective")}
    f, c = cols["full"], cols["collective"]
    ratio = {k: (c["total"][k] / f["total"][k] if f["total"][k] else None)
             for k in ("payload", "records", "lmdb_disk")}
    ratio["batch_bytes_mean"] = c["batch"]["bytes_mean"] / f["batch"]["bytes_mean"]
    ratio["batch_ms_mean"] = c["batch"]["ms_mean"] / f["batch"]["ms_mean"]
    return {
        "users": users, "format": asdict(fmt), "lengths": cached.summary(),
        "bandwidth": asdict(bandwidth), "budgets": asdict(budgets),
        "full": f, "collective": c, "collective_over_full": ratio,
        "paper_padded_fp32_batch_bytes": batch * cached.max * 2 * fmt.d_attn * 4,
    }
