"""Synthetic user bases for prefill benchmarks and tests (numpy + pyarrow only).

Histories follow the canonical schema (docs/data_schema.md: user_id int64, items list<int32>,
timestamps list<int64>, labels list<int8>): item popularity is Zipf(s) over ``n_items`` items
(popularity ranks shuffled over the ids), history lengths are log-uniform on 1..max_len (so many
short histories and a long tail up to max_len), labels are Bernoulli(p_pos). Deterministic in
``seed``; generated in chunks of users so memory stays bounded.

SYNTHETIC user base at scale (``lengths="fig8"``, ``n_clusters > 0``; benchmarks/scale.py): every
user belongs to one of ``n_clusters`` taste clusters (cluster weights Zipf(1) over the clusters);
each behaviour is, with probability ``p_cluster``, drawn from the user's cluster (its own Zipf(s)
popularity over its own shuffle of the items) and otherwise from the global popularity; history
lengths are log-normal, median 122, sigma 0.57 (p90 ~253, ~0.9% above 470: the long-tailed shape of
the paper's Figure 8), clipped to 1..max_len. None of it is real data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HISTORIES_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
        ("labels", pa.list_(pa.int8())),
    ]
)


def zipf_cdf(n_items: int, s: float) -> np.ndarray:
    """Cumulative popularity of ranks 1..n_items under Zipf(s)."""
    w = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** s
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


FIG8_MEDIAN, FIG8_SIGMA = 122.0, 0.57  # log-normal history lengths: p50 122, p90 ~253, P(> 470) ~0.9%


def sample_lengths(rng: np.random.Generator, n: int, max_len: int, dist: str = "loguniform") -> np.ndarray:
    """History lengths (int64, 1..max_len): "loguniform" on 1..max_len, or "fig8" (log-normal, see above)."""
    if dist == "loguniform":
        raw = np.floor(np.exp(rng.uniform(0.0, np.log(max_len + 1), n)))
    elif dist == "fig8":
        raw = np.round(np.exp(rng.normal(np.log(FIG8_MEDIAN), FIG8_SIGMA, n)))
    else:
        raise ValueError(f"length distribution {dist!r}: loguniform or fig8")
    return np.clip(raw.astype(np.int64), 1, max_len)


def history_batches(n_users: int, *, n_items: int = 100_000, max_len: int = 1000, zipf_s: float = 1.1,
                    p_pos: float = 0.5, seed: int = 0, first_user: int = 0, chunk_users: int = 10_000,
                    lengths: str = "loguniform", n_clusters: int = 0, p_cluster: float = 0.7
                    ) -> Iterator[pa.RecordBatch]:
    """Record batches of ``chunk_users`` synthetic users with ids first_user, first_user + 1, ...
    ``lengths``: "loguniform" or "fig8"; ``n_clusters`` > 0: taste-cluster mixture (module docstring)."""
    cdf = zipf_cdf(n_items, zipf_s)
    base = np.random.default_rng(seed)
    perm = base.permutation(n_items).astype(np.int32) + 1  # rank -> item id
    if n_clusters:
        perms = np.stack([base.permutation(n_items).astype(np.int32) + 1 for _ in range(n_clusters)])
        cluster_cdf = zipf_cdf(n_clusters, 1.0)
    dist = lengths
    for lo in range(0, n_users, chunk_users):
        rng = np.random.default_rng([seed, first_user + lo])
        b = min(chunk_users, n_users - lo)
        lengths_ = sample_lengths(rng, b, max_len, dist)
        total = int(lengths_.sum())
        offsets = np.zeros(b + 1, np.int32)
        np.cumsum(lengths_, out=offsets[1:])
        ranks = np.minimum(np.searchsorted(cdf, rng.random(total), side="right"), n_items - 1)
        items = perm[ranks]
        if n_clusters:
            cluster = np.repeat(np.searchsorted(cluster_cdf, rng.random(b), side="right"), lengths_)
            own = rng.random(total) < p_cluster
            items[own] = perms[np.minimum(cluster[own], n_clusters - 1), ranks[own]]
        labels = (rng.random(total) < p_pos).astype(np.int8)
        steps = rng.integers(1, 3600, total)
        ts = 1_600_000_000 + np.cumsum(steps)  # increasing within each user (offset per user irrelevant)
        off = pa.array(offsets)
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(first_user + lo, first_user + lo + b, dtype=np.int64)),
             pa.ListArray.from_arrays(off, pa.array(items)),
             pa.ListArray.from_arrays(off, pa.array(ts.astype(np.int64))),
             pa.ListArray.from_arrays(off, pa.array(labels))],
            schema=HISTORIES_SCHEMA)


def write_histories(out_dir: str | Path, n_users: int, *, files: int = 16, row_group_users: int = 5_000,
                    **kwargs: float | int) -> list[Path]:
    """Write ``n_users`` synthetic histories as ``files`` Parquet files of contiguous user ranges."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_file = -(-n_users // files)
    paths = []
    for i in range(files):
        lo, hi = i * per_file, min(n_users, (i + 1) * per_file)
        if lo >= hi:
            break
        path = out / f"part-{i:05d}.parquet"
        with pq.ParquetWriter(path, HISTORIES_SCHEMA) as writer:
            for batch in history_batches(hi - lo, first_user=lo, chunk_users=row_group_users, **kwargs):
                writer.write_batch(batch, row_group_size=row_group_users)
        paths.append(path)
    return paths
