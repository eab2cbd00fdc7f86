"""`ckv report size`: the compression-rate report of a published store (optionally vs a baseline store).

CR (docs/prefill.md, the README's definition; ``model.cache_spec.compression_rate``): the bytes one
user's cache entry holds at a full window — every part of the store's layout
(``model.cache_spec.entry_parts``) at its stored dtype: user-specific K/V, router indices, retrieval
keys — divided by the bytes of that user's full K and V in fp32 (every group's K and V rows × d_a × 4).
For din that is per behaviour ``((dk + dv) * kv_size + idx_size * (k_shared + v_shared)) / (2 * d_attn
* 4)``; the tests check the report against ``model.cache_spec``. Reported:

- ``cr.formula``: that ratio (``layout.record_size(max_len) - 32`` over the full fp32 K/V of a full
  window); ``cr.payload``: measured payload bytes / full fp32 bytes of the stored rows
  (``stats.part_rows`` of the build: Σ min(n, cap) per part); ``cr.records``: with the 32-byte record
  headers; ``cr.lmdb_disk``: data.mdb's allocated bytes / full fp32 bytes (LMDB overhead too);
- with ``--baseline FULL_STORE``: the same users' measured ratios store / baseline (payload, records,
  LMDB on disk, Parquet). A baseline at fp16 is half the fp32 reference; its kv dtype is shown;
- ``token_table``: the token-table alternative for the store's model (pipeline/reports/token_table.py),
  or why it does not apply.

Everything comes from the manifests (no scan of the data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from collectivekv.cachestore.store.entry import EntryLayout, layout_from_dict
from collectivekv.cachestore.store.record import HEADER_SIZE, KV_DTYPES
from collectivekv.model.cache_spec import EntryPart
from collectivekv.model.config import ModelConfig, config_from_dict
from collectivekv.pipeline.reports.token_table import token_lines, token_table
from collectivekv.pipeline.store.store_ops import read_manifest


def side_parts(layout: EntryLayout) -> list[EntryPart]:
    """One part per cached K or V side, holding that side's rows: its user part, or for a V of pool rows alone (no
    user part) its index part — the full K/V the CR's denominator counts."""
    named = {p.name: p for p in layout.parts}
    out = []
    for g in layout.groups:
        if g.has_k:
            out.append(named[f"{g.name}.k_user"])
        out.append(named[f"{g.name}.v_user" if g.dv else g.idx_part("v")])
    return out


def store_sizes(store: str | os.PathLike, d_attn: int | None = None) -> dict[str, Any]:
    """Sizes and CRs of the version STORE/current points to (see the module docstring)."""
    version, m = read_manifest(store)
    layout = layout_from_dict(m["layout"])
    stats = m["stats"]
    kv = [p for p in layout.parts if p.kind in ("kv", "q8")]  # the K and V user parts (or whole K / V)
    sides = side_parts(layout)
    recorded = (m.get("dims") or {}).get("d_attn") or (kv[0].width if layout.mode == "full" and kv else None)
    if d_attn is not None and recorded is not None and d_attn != recorded:
        raise ValueError(f"{store}: --d-attn {d_attn} contradicts the store's d_attn {recorded} (leave it out)")
    d_a = recorded or d_attn
    users, behaviours = stats["users"], stats["behaviours"]
    parquet = sum(f["bytes"] for f in m["parquet"]["files"] if f["name"].endswith(".parquet"))
    b = {"payload": stats["payload_bytes"], "records": stats["record_bytes"], "lmdb_file": stats["file_bytes"],
         "lmdb_disk": stats["disk_bytes"], "parquet": parquet}
    window = layout.record_size(layout.max_len) - HEADER_SIZE
    g = layout.flat_group  # din: one group, a constant number of bytes per behaviour
    out: dict[str, Any] = {
        "store": str(Path(store)), "version_id": version.name, "model_version": layout.model_version,
        "arch": layout.arch, "mode": layout.mode, "kv_dtype": layout.kv_dtype, "idx_dtype": layout.idx_dtype,
        "dk": g.dk if g else None, "dv": g.dv if g else None, "d_attn": d_a, "pool_size": layout.pool_size,
        "users": users, "behaviours": behaviours, "bytes": b,
        "per_user": {k: (v / users if users else 0.0) for k, v in b.items()},
        "bytes_per_behaviour": sum(layout.row_bytes) if g else None, "bytes_per_full_window": window,
        "max_len": layout.max_len,
        "parts": [{"name": p.name, "kind": p.kind, "width": p.width, "cap": p.cap} for p in layout.parts],
    }  # fmt: skip
    rows = stats.get("part_rows") or {p.name: behaviours for p in layout.parts if g is not None}
    if d_a:
        full_window = sum(min(layout.max_len, p.cap) for p in sides) * d_a * 4
        full = sum(rows[p.name] for p in sides) * d_a * 4 if rows else None
        out["full_fp32_bytes"] = full
        out["cr"] = {"formula": window / full_window if full_window else None,
                     **{k: (b[k] / full if full else None) for k in ("payload", "records", "lmdb_disk")}}
    else:
        out["full_fp32_bytes"] = None
        out["cr"] = None
    cfg = recorded_model(m)
    if cfg is not None:
        out["token_table"] = token_table(
            cfg, users=users, behaviours=behaviours,
            kv_itemsize=KV_DTYPES[layout.kv_dtype][1].itemsize, full_fp32_bytes=out["full_fp32_bytes"],
            collective_store_bytes=b["payload"] if layout.mode == "collective" else None)
    return out


def recorded_model(manifest: dict[str, Any]) -> ModelConfig | None:
    """The model config a store's prefill recorded (``prefill.model_config``), None when it records none."""
    model = (manifest.get("prefill") or {}).get("model_config")
    try:
        return config_from_dict(model) if isinstance(model, dict) else None
    except (TypeError, ValueError):  # a partial record (stores built outside the prefill job)
        return None


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


def fmt_bytes(n: float | None) -> str:
    """Bytes in binary units ("-" for None), shared by the text and HTML reports."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f}%"


def size_rows(rep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of :func:`size_report`'s dict: one column per store (store, baseline), as text.
    The one table layout behind both the plain-text report and the HTML report."""
    cols = [("store", rep["store"])] + ([("baseline", rep["baseline"])] if "baseline" in rep else [])
    rows: list[list[str]] = []

    def row(label: str, fn: Any) -> None:
        rows.append([label, *(str(fn(s)) for _, s in cols)])

    row("path", lambda s: s["store"])
    row("version", lambda s: s["version_id"])
    row("model version", lambda s: s["model_version"])
    row("mode", lambda s: s["mode"])
    row("kv / index dtype", lambda s: f"{s['kv_dtype']} / {s['idx_dtype'] or '-'}")
    row("arch (parts)", lambda s: f"{s['arch']} ({len(s['parts'])} parts)")
    row("dk, dv (d_attn)", lambda s: f"{s['dk'] if s['dk'] is not None else '-'}, "
                                     f"{s['dv'] if s['dv'] is not None else '-'} ({s['d_attn'] or '?'})")
    row("pool size", lambda s: f"{s['pool_size']:,}")
    row("users", lambda s: f"{s['users']:,}")
    row("behaviours", lambda s: f"{s['behaviours']:,}")
    row("bytes / behaviour", lambda s: "-" if s["bytes_per_behaviour"] is None else s["bytes_per_behaviour"])
    row("payload bytes at a full window", lambda s: s["bytes_per_full_window"])
    for key, label in (("payload", "payload"), ("records", "records (+32 B header)"), ("lmdb_disk", "LMDB on disk"),
                       ("parquet", "Parquet")):
        row(f"{label} total", lambda s, k=key: fmt_bytes(s["bytes"][k]))
        row(f"{label} per user", lambda s, k=key: f"{s['per_user'][k]:,.1f} B")
    row("full fp32 K,V of the same behaviours", lambda s: fmt_bytes(s["full_fp32_bytes"] or None))
    for key, label in (("formula", "CR formula"), ("payload", "CR payload (measured)"), ("records", "CR records"),
                       ("lmdb_disk", "CR LMDB on disk")):
        row(label, lambda s, k=key: fmt_pct(s["cr"][k]) if s["cr"] else "-")
    return ["", *(name for name, _ in cols)], rows


def baseline_summary(rep: dict[str, Any]) -> str | None:
    """The measured store / baseline ratios as one line (None without a baseline)."""
    if "vs_baseline" not in rep:
        return None
    v = rep["vs_baseline"]
    return (f"store / baseline ({v['baseline_kv_dtype']} baseline, same users: {v['same_users']}): "
            + ", ".join(f"{k} {fmt_pct(v[k])}" for k in ("payload", "records", "lmdb_disk", "parquet")))


def format_report(rep: dict[str, Any]) -> str:
    """A plain-text table of :func:`size_report`'s dict."""
    header, body = size_rows(rep)
    rows = [header, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    summary = baseline_summary(rep)
    if summary:
        lines += ["", summary]
    if rep["store"].get("token_table"):
        lines += ["", *token_lines(rep["store"]["token_table"])]
    return "\n".join(lines)
