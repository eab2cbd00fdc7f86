"""`ckv report size`: the compression-rate report of a published store (optionally vs a baseline store).

CR (docs/prefill.md, the README's definition): the bytes one user's cache entry holds — user-specific
K and V at their stored dtype + router indices at their stored integer width — divided by the bytes
of that user's full K and V in fp32 at the same sequence length. Per behaviour that is
``((dk + dv) * kv_size + idx_size * (k_shared + v_shared)) / (2 * d_attn * 4)``
(= ``model.cache.compression_rate`` for a collective store; the tests check it). Reported:

- ``cr.formula``: that ratio; ``cr.payload``: measured payload bytes / full fp32 bytes of the same
  behaviours (equal to the formula: the payload has no padding); ``cr.records``: with the 32-byte
  record headers; ``cr.lmdb_disk``: data.mdb's allocated bytes / full fp32 bytes (LMDB overhead too);
- with ``--baseline FULL_STORE``: the same users' measured ratios store / baseline (payload, records,
  LMDB on disk, Parquet). A baseline at fp16 is half the fp32 reference; its kv dtype is shown.

Everything comes from the manifests (no scan of the data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cachestore.record import HEADER_SIZE, CacheLayout
from pipeline.store_ops import read_manifest


def store_sizes(store: str | os.PathLike, d_attn: int | None = None) -> dict[str, Any]:
    """Sizes and CRs of the version STORE/current points to."""
    version, m = read_manifest(store)
    layout = CacheLayout.from_dict(m["layout"])
    stats = m["stats"]
    d_a = d_attn or (m.get("dims") or {}).get("d_attn") or (layout.dk if layout.mode == "full" else None)
    users, behaviours = stats["users"], stats["behaviours"]
    parquet = sum(f["bytes"] for f in m["parquet"]["files"] if f["name"].endswith(".parquet"))
    b = {"payload": stats["payload_bytes"], "records": stats["record_bytes"], "lmdb_file": stats["file_bytes"],
         "lmdb_disk": stats["disk_bytes"], "parquet": parquet}
    per_behaviour = layout.record_size(1) - HEADER_SIZE
    out: dict[str, Any] = {
        "store": str(Path(store)), "version_id": version.name, "model_version": layout.model_version,
        "mode": layout.mode, "kv_dtype": layout.kv_dtype, "idx_dtype": layout.idx_dtype, "dk": layout.dk,
        "dv": layout.dv, "d_attn": d_a, "pool_size": layout.pool_size, "users": users,
        "behaviours": behaviours, "bytes": b,
        "per_user": {k: (v / users if users else 0.0) for k, v in b.items()},
        "bytes_per_behaviour": per_behaviour,
    }  # fmt: skip
    if d_a:
        full = behaviours * 2 * d_a * 4
        out["full_fp32_bytes"] = full
        out["cr"] = {"formula": per_behaviour / (2 * d_a * 4),
                     **{k: (b[k] / full if full else None) for k in ("payload", "records", "lmdb_disk")}}
    else:
        out["full_fp32_bytes"] = None
        out["cr"] = None
    return out


def size_report(store: str | os.PathLike, baseline: str | os.PathLike | None = None,
                d_attn: int | None = None) -> dict[str, Any]:
    """The report of STORE (and of BASELINE with the measured ratios) as a JSON-ready dict."""
    rep: dict[str, Any] = {"store": store_sizes(store, d_attn)}
    if baseline is not None:
        base = store_sizes(baseline, d_attn)
        s = rep["store"]
        rep["baseline"] = base
        rep["vs_baseline"] = {
            "same_users": s["users"] == base["users"] and s["behaviours"] == base["behaviours"],
            "baseline_kv_dtype": base["kv_dtype"],
            **{k: (s["bytes"][k] / base["bytes"][k] if base["bytes"][k] else None)
               for k in ("payload", "records", "lmdb_disk", "parquet")},
        }
    return rep


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f}%"


def format_report(rep: dict[str, Any]) -> str:
    """A plain-text table of :func:`size_report`'s dict."""
    cols = [("store", rep["store"])] + ([("baseline", rep["baseline"])] if "baseline" in rep else [])
    rows: list[tuple[str, ...]] = [("", *(name for name, _ in cols))]

    def row(label: str, fn: Any) -> None:
        rows.append((label, *(fn(s) for _, s in cols)))

    row("path", lambda s: s["store"])
    row("version", lambda s: s["version_id"])
    row("mode", lambda s: s["mode"])
    row("kv / index dtype", lambda s: f"{s['kv_dtype']} / {s['idx_dtype'] or '-'}")
    row("dk, dv (d_attn)", lambda s: f"{s['dk']}, {s['dv']} ({s['d_attn'] or '?'})")
    row("users", lambda s: f"{s['users']:,}")
    row("behaviours", lambda s: f"{s['behaviours']:,}")
    row("bytes / behaviour", lambda s: f"{s['bytes_per_behaviour']}")
    for key, label in (("payload", "payload"), ("records", "records (+32 B header)"), ("lmdb_disk", "LMDB on disk"),
                       ("parquet", "Parquet")):
        row(f"{label} total", lambda s, k=key: _fmt_bytes(s["bytes"][k]))
        row(f"{label} per user", lambda s, k=key: f"{s['per_user'][k]:.1f} B")
    row("full fp32 K,V (same users)", lambda s: _fmt_bytes(s["full_fp32_bytes"]) if s["full_fp32_bytes"] else "-")
    row("CR formula", lambda s: _pct(s["cr"]["formula"]) if s["cr"] else "-")
    row("CR payload (measured)", lambda s: _pct(s["cr"]["payload"]) if s["cr"] else "-")
    row("CR records", lambda s: _pct(s["cr"]["records"]) if s["cr"] else "-")
    row("CR LMDB on disk", lambda s: _pct(s["cr"]["lmdb_disk"]) if s["cr"] else "-")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "vs_baseline" in rep:
        v = rep["vs_baseline"]
        lines.append("")
        lines.append(f"store / baseline ({v['baseline_kv_dtype']} baseline, same users: {v['same_users']}): "
                     + ", ".join(f"{k} {_pct(v[k])}" for k in ("payload", "records", "lmdb_disk", "parquet")))
    return "\n".join(lines)
