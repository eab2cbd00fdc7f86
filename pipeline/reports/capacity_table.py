"""The capacity table: :func:`pipeline.reports.capacity.capacity_plan`'s dict as rows of text, shared by
`ckv capacity` (plain text / JSON) and the HTML report. Formatting only; the model is in
:mod:`pipeline.reports.capacity`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _b(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _n(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n:,}" if n < 1e12 else f"{n:.3g}"


def _r(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f}%"


@dataclass
class Table:
    """Rows of (label, full KV, CollectiveKV, CollectiveKV / full) plus notes under the table."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def capacity_table(plan: dict[str, Any]) -> Table:
    """The capacity table of :func:`capacity_plan`'s dict (shared by the CLI text and the HTML report)."""
    f, c, r = plan["full"], plan["collective"], plan["collective_over_full"]
    t = Table()

    def row(label: str, fv: str, cv: str, ratio: float | None = None) -> None:
        t.rows.append((label, fv, cv, _r(ratio) if ratio is not None else ""))

    def lay(col: dict) -> str:
        lo = col["layout"]
        s = f"{lo.get('user_dtype', lo['kv_dtype'])} K,V {lo['dk']}+{lo['dv']}"
        return s + (f", {lo['idx_dtype']} idx x{lo['indices']}" if lo["idx_dtype"] else "")

    row("cached per behaviour", lay(f), lay(c))
    row("bytes / behaviour", str(f["bytes_per_behaviour"]), str(c["bytes_per_behaviour"]),
        c["bytes_per_behaviour"] / f["bytes_per_behaviour"])
    row("CR vs full fp32 K,V", _r(f["cr_vs_full_fp32"]), _r(c["cr_vs_full_fp32"]))
    for key, label in (("payload", "payload"), ("records", "record (+32 B header)"),
                       ("lmdb_disk", "LMDB on disk (page model)")):
        row(f"{label} / user", f"{f['per_user'][key]:,.1f} B", f"{c['per_user'][key]:,.1f} B")
    users = plan["users"]
    for key, label in (("payload", "payload"), ("records", "records"), ("lmdb_disk", "LMDB on disk (page model)")):
        row(f"{label}, {_n(users)} users", _b(f["total"][key]), _b(c["total"][key]), r[key])
    if any("lmdb_disk_measured_overhead" in col["total"] for col in (f, c)):
        row("LMDB on disk (store's measured overhead)",
            _b(f["total"].get("lmdb_disk_measured_overhead")), _b(c["total"].get("lmdb_disk_measured_overhead")))
        row("Parquet copy (store's measured ratio)", _b(f["total"].get("parquet_measured_ratio")),
            _b(c["total"].get("parquet_measured_ratio")))
    row("GPU-resident pool (fp32)", _b(f["gpu_pool_bytes"]), _b(c["gpu_pool_bytes"]))
    b = plan["full"]["batch"]["users"]
    row(f"H2D bytes / batch of {b} (mean)", _b(f["batch"]["bytes_mean"]), _b(c["batch"]["bytes_mean"]),
        r["batch_bytes_mean"])
    row(f"H2D time / batch of {b} (mean)", f"{f['batch']['ms_mean']:.3f} ms", f"{c['batch']['ms_mean']:.3f} ms",
        r["batch_ms_mean"])
    row(f"H2D bytes / batch of {b} (all at max length)", _b(f["batch"]["bytes_all_at_max"]),
        _b(c["batch"]["bytes_all_at_max"]))
    row(f"H2D time / batch of {b} (all at max length)", f"{f['batch']['ms_all_at_max']:.3f} ms",
        f"{c['batch']['ms_all_at_max']:.3f} ms")
    bud = plan["budgets"]
    row(f"users fitting {bud['host_mem_gib']:g} GiB host memory (LMDB)", _n(f["fits"]["host_users"]),
        _n(c["fits"]["host_users"]))
    row(f"users fitting {bud['gpu_mem_gib']:g} GiB GPU memory (records, after pool)", _n(f["fits"]["gpu_users"]),
        _n(c["fits"]["gpu_users"]))
    for key, what in (("hosts", f"hosts of {bud['host_mem_gib']:g} GiB"),
                      ("gpus", f"GPUs of {bud['gpu_mem_gib']:g} GiB, records resident")):
        row(f"shards = {what}, {_n(users)} users", _n(f["shards"][key]), _n(c["shards"][key]))
    lengths = plan["lengths"]
    t.notes.append(f"lengths: {lengths['source']} — mean {lengths['mean']:.1f}, p50 {lengths['p50']}, "
                   f"p90 {lengths['p90']}, max {lengths['max']}" + (f" ({lengths['note']})" if lengths["note"] else ""))
    t.notes.append(f"bandwidth: {plan['bandwidth']['source']}")
    for col in (f, c):
        if "calibration" in col:
            cal = col["calibration"]
            t.notes.append(f"calibration ({col['layout']['mode']} column): store {cal['store']} "
                           f"({cal['users']:,} users) measured LMDB on disk / records = {cal['lmdb_overhead']:.4f}, "
                           f"Parquet / records = {cal['parquet_ratio']:.4f}")
    t.notes.append(f"paper-style full KV batch (padded fp32 K,V at max length): "
                   f"{_b(plan['paper_padded_fp32_batch_bytes'])}")
    return t


def format_table(table: Table) -> str:
    """Plain-text rendering of a :class:`Table`."""
    rows = [("", "full KV", "CollectiveKV", "Collective/full"), *table.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             .rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + [f"- {n}" for n in table.notes])
