"""`ckv report html`: one self-contained HTML page about a published store — the size report
(pipeline/reports/size_report.py), the capacity table (pipeline/reports/capacity.py) for the store's own user count and
a projection, the latency results in benchmarks/results, and the K/V / router analysis plots
(pipeline/reports/analysis.py). Plots are embedded as base64 PNG, tables are HTML; no external resources.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from collectivekv.pipeline.reports.capacity import Budgets, capacity_plan
from collectivekv.pipeline.reports.capacity_inputs import (
    bandwidth,
    read_results,
    store_calibration,
    store_format,
    store_lengths,
)
from collectivekv.pipeline.reports.capacity_table import Table, capacity_table
from collectivekv.pipeline.reports.size_report import baseline_summary, fmt_bytes, size_report, size_rows
from collectivekv.pipeline.reports.token_table import token_lines

SECTIONS = ("size", "capacity", "latency", "analysis")
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin-bottom:6px} .meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 12px} td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:6px 10px;margin:8px 0;font-size:13px}
.note{color:#555;font-size:12px;margin:2px 0} img{max-width:100%;border:1px solid #eee;margin:6px 0}
nav a{margin-right:14px;font-size:13px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def png_data_uri(path: str | os.PathLike) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_table(header: list[str], rows: list[list[Any]], num_from: int = 1) -> str:
    """An HTML table; cells from column ``num_from`` on are right-aligned."""
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class='num'>{_e(c)}</td>" if i >= num_from else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _table_html(t: Table) -> str:
    body = html_table(["", "full KV", "CollectiveKV", "CollectiveKV / full"], [list(r) for r in t.rows])
    return body + "".join(f"<p class='note'>{_e(n)}</p>" for n in t.notes)


# ------------------------------------------------------------------------------------ sections
def size_section(rep: dict[str, Any]) -> str:
    header, rows = size_rows(rep)
    out = html_table(header, rows)
    summary = baseline_summary(rep)
    out += f"<p class='note'>{_e(summary)}</p>" if summary else ""
    token = rep["store"].get("token_table")
    if token:
        head, *rest = token_lines(token)
        out += f"<h3>{_e(head)}</h3>" + "".join(f"<p class='note'>{_e(line.strip())}</p>" for line in rest)
    return out


def latency_section(results: dict[str, Any]) -> str:
    parts: list[str] = []
    gpu, dry = results.get("decode_gpu"), results.get("decode_cpu_dryrun")
    res = gpu if gpu is not None else dry
    if gpu is None:
        parts.append("<div class='banner'><b>CPU DRY RUN — not the GPU result.</b> "
                     f"{_e(results['decode_gpu_path'])} is missing (no GPU run of benchmarks/decode_latency.py in "
                     "this results directory); the figures below only prove the benchmark runs end to end "
                     f"({_e(results['decode_cpu_dryrun_path'])}).</div>")
    if res is None:
        parts.append("<p>No decode latency results found.</p>")
    else:
        m = res.get("machine", {})
        lim = res.get("copy_limits", {})
        parts.append(f"<h3>Decode latency (paper Table 2) — {_e(m.get('gpu') or m.get('cpu') or m.get('device'))}"
                     f"{' — CPU DRY RUN' if res.get('dry_run') else ''}</h3>")
        parts.append(f"<p class='note'>command: <code>{_e(res.get('command', ''))}</code>; copy floor "
                     f"{lim.get('floor_gb_per_s', float('nan')):.2f} GB/s + "
                     f"{lim.get('floor_fixed_ms', float('nan')) * 1e3:.1f} us per copy; {_e(res.get('note', ''))}</p>")

        def ms(x: Any) -> str:
            return "-" if not x else f"{x['median_ms']:.3f}"

        rows = [[r["L"], r["B"], ms(r.get("a_full_pinned")), ms(r.get("b_full_pageable")), f"{r['c_ms']:.3f}",
                 r.get("c_auto_path", ""), f"{r['floor_ms']:.4f}",
                 "-" if r.get("speedup_vs_a") is None else f"{r['speedup_vs_a']:.1f}x",
                 "-" if r.get("speedup_vs_b") is None else f"{r['speedup_vs_b']:.2f}x"]
                for r in res.get("rows", [])]
        parts.append(html_table(["L", "B", "(a) full pinned ms", "(b) full pageable ms", "(c) CollectiveKV ms",
                                 "auto path", "copy floor ms", "a / c", "b / c"], rows, num_from=0))
        fetch = res.get("fetch") or {}
        frows = [[length, way, b, f"{v['median_ms']:.3f}", f"{v['p90_ms']:.3f}", f"{v['bytes']:,}",
                  f"{v['users_per_s']:,.0f}"]
                 for length, per in fetch.items() if isinstance(per, dict) and "users_in_store" in per
                 for way, ways in (("copy", per), ("zero-copy", per.get("zero_copy") or {}))
                 for b, v in ways.items() if b.isdigit()]
        if frows:
            parts.append("<h3>LMDB fetch + pack on one CPU core (copying; zero-copy: lookups + gather table, "
                         "the GPU gathers the records)</h3>")
            parts.append(html_table(["L", "fetch", "users", "median ms", "p90 ms", "bytes moved by the CPU",
                                     "users/s"], frows, num_from=0))
        png = Path(results["decode_gpu_path" if gpu is not None else "decode_cpu_dryrun_path"]).with_suffix(".png")
        if png.is_file():
            parts.append(f"<img alt='decode latency plot' src='{png_data_uri(png)}'>")
    pre = results.get("prefill_cpu")
    if pre is not None:
        parts.append(f"<h3>Nightly prefill throughput (CPU, {_e(pre.get('machine', {}).get('cpus'))} cores)</h3>")
        d = pre.get("inputs", {}).get("data", {})
        parts.append(f"<p class='note'>{d.get('users', 0):,} synthetic users, {d.get('behaviours', 0):,} behaviours "
                     f"(mean length {d.get('mean_length', 0):.0f}); command: <code>{_e(pre.get('command', ''))}</code>"
                     "</p>")
        rows = [[name, r.get("engine"), f"{r.get('users_per_s_spark_stage', 0):,.0f}",
                 f"{r.get('users_per_s_job', 0):,.0f}", f"{r.get('users_per_s_wall', 0):,.0f}",
                 fmt_bytes(r.get("bytes", {}).get("lmdb_disk"))] for name, r in pre.get("runs", {}).items()]
        parts.append(html_table(["run", "engine", "users/s (Spark stage)", "users/s (job)", "users/s (wall)",
                                 "LMDB on disk"], rows))
    return "\n".join(parts)


def analysis_section(analyses: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for a in analyses:
        if "error" in a:
            parts.append(f"<p class='banner'>{_e(a['label'])}: analysis skipped — {_e(a['error'])}</p>")
            continue
        parts.append(f"<h3>{_e(a['label'])}: checkpoint {_e(a['checkpoint'])} (model {_e(a['model_version'])}, "
                     f"{_e(a['kv_mode'])}), {a['sampled_users']:,} of {a['users']:,} users sampled</h3>")
        rows = []
        for fig, key in (("fig1", "mean_K"), ("fig1", "mean_V"), ("fig2", "principal_K"), ("fig2", "residual_K"),
                         ("fig2", "principal_V"), ("fig2", "residual_V")):
            p = a[fig][key]["pairs"]
            if p.get("n"):
                rows.append([key.replace("_", " "), f"{p['n']:,}", f"{p['mean']:.3f}", f"{p['median']:.3f}",
                             f"{p['p05']:.3f}", f"{p['p95']:.3f}", f"{p['frac_positive']:.1%}",
                             f"{p['frac_abs_lt_0.5']:.1%}"])
        parts.append(html_table(["cross-user cosine of", "pairs", "mean", "median", "p05", "p95", "> 0", "|x| < 0.5"],
                                rows))
        r = a.get("router")
        if r:
            urows = [[name, f"{u['pool_size']:,}", f"{u['used']:,}", f"{u['never_chosen_frac']:.1%}",
                      f"{u['entropy_normalised']:.3f}", f"{u['perplexity']:,.0f}", f"{u['top1pct_share']:.1%}"]
                     for name in ("K", "V") if (u := r.get(f"utilisation_{name}"))]
            parts.append(html_table(["pool", "rows", "used", "never chosen", "entropy / log(pool)", "perplexity",
                                     "top 1% rows' share"], urows))
            f7 = r["fig7"]
            ov = "; ".join(f"{name}: Jaccard {o['jaccard']:.3f}, |A∩B|/min {o['overlap_coefficient']:.3f} "
                           f"({o['intersection']} shared of {o['a']} and {o['b']})"
                           for name in ("K", "V") if (o := f7.get(f"overlap_{name}")))
            parts.append(f"<p class='note'>Figure 7 pair: users {_e(f7.get('user_ids'))}, history cosine "
                         f"{f7['history_cosine']:.4f} (&gt; 0.8: {_e(f7['above_0.8'])}); overlap {ov}</p>")
        elif a.get("router_note"):
            parts.append(f"<p class='note'>{_e(a['router_note'])}</p>")
        for name, path in a["figures"].items():
            parts.append(f"<img alt='{_e(name)}' src='{png_data_uri(path)}'>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- the page
def _histories_of(store_manifest: dict[str, Any]) -> str | None:
    h = ((store_manifest.get("prefill") or {}).get("histories") or "").removeprefix("file://")
    return h if h and Path(h).exists() else None


def _checkpoint_d_attn(checkpoint: str | os.PathLike) -> int | None:
    """The checkpoint's d_a (its config.json), for a store whose manifest does not record it; None if unreadable."""
    from collectivekv.cachestore.checkpoint import CONFIG_FILE

    try:
        return int(json.loads((Path(checkpoint) / CONFIG_FILE).read_text())["model"]["d_attn"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_report(store: str | os.PathLike, checkpoint: str | os.PathLike, *, histories: str | os.PathLike | None = None,
                 baseline: str | os.PathLike | None = None, baseline_checkpoint: str | os.PathLike | None = None,
                 results_dir: str | os.PathLike | None = None, project_users: int = 100_000_000,
                 analysis_users: int = 1000, batch: int = 512, bandwidth_spec: str = "measured",
                 budgets: Budgets | None = None, seed: int = 0) -> str:
    """The HTML page (a string). ``histories`` defaults to the ones the store was prefilled from."""
    from collectivekv.pipeline.reports.analysis_plots import run_analysis
    from collectivekv.pipeline.store.store_ops import read_manifest

    version, manifest = read_manifest(store)
    rep = size_report(store, baseline)
    results = read_results(results_dir)
    bw = bandwidth(bandwidth_spec, results_dir)
    try:
        dist, cal = store_lengths(store), store_calibration(store)
        fmt = store_format(store, fallback_d_attn=_checkpoint_d_attn(checkpoint))
        own = capacity_plan(cal.users, dist, fmt, batch=batch, bandwidth=bw, budgets=budgets, calibration=cal,
                            seed=seed)
        proj = capacity_plan(project_users, dist, fmt, batch=batch, bandwidth=bw, budgets=budgets, calibration=cal,
                             seed=seed)
    except ValueError as exc:  # e.g. a store whose manifest records no model config: the page says why
        capacity = [f"<p class='note'>{_e(exc)}</p>"]
    else:
        capacity = [f"<h3>This store's users ({cal.users:,})</h3>", _table_html(capacity_table(own)),
                    f"<h3>Projection to {project_users:,} users (same length distribution and layout)</h3>",
                    _table_html(capacity_table(proj))]
    hist = str(histories) if histories is not None else _histories_of(manifest)
    analyses: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ckv-report-") as tmp:
        runs = [("store checkpoint", checkpoint)] + ([("baseline checkpoint", baseline_checkpoint)]
                                                     if baseline_checkpoint else [])
        for i, (label, ckpt) in enumerate(runs):
            if hist is None:
                analyses.append({"label": label, "error": "no histories (give --histories)"})
                continue
            try:
                a = run_analysis(ckpt, hist, tmp, n_sample=analysis_users, seed=seed, prefix=f"a{i}_", title=label)
            except ValueError as exc:
                analyses.append({"label": label, "error": str(exc)})
                continue
            analyses.append({"label": label, **a})
        body = [
            f"<h1>CollectiveKV store report</h1><p class='meta'>store <code>{_e(store)}</code>, version "
            f"{_e(version.name)}, model {_e(manifest.get('model_version', rep['store']['model_version']))}, "
            f"built {_e(manifest.get('created_at') or manifest.get('created_utc', '?'))}; report generated "
            f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}</p>",
            "<nav>" + "".join(f"<a href='#{s}'>{s}</a>" for s in SECTIONS) + "</nav>",
            "<h2 id='size'>Size report</h2>", size_section(rep),
            "<h2 id='capacity'>Capacity: full KV vs CollectiveKV</h2>", *capacity,
            "<h2 id='latency'>Latency</h2>", latency_section(results),
            "<h2 id='analysis'>K/V and router analysis (paper Figures 1, 2, 6, 7)</h2>",
            f"<p class='note'>histories: {_e(hist)}</p>", analysis_section(analyses),
        ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>CollectiveKV report — {_e(Path(store).name)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(out: str | os.PathLike, page: str) -> Path:
    """Write the page atomically (temp file + rename)."""
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, p)
    return p
