"""Tables and plots of `ckv eval`: per-section summaries (mean ± std over seeds; paired differences from
the full-KV row with bootstrap intervals over users, training diagnostics and per-epoch curves:
:mod:`pipeline.training.quality_report`), the Markdown report and the Figure 4/5 sweeps. Pure formatting
over the run records of :mod:`pipeline.training.zoo_eval`."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from collectivekv.model.config import config_to_dict
from collectivekv.model.metrics import METRICS
from collectivekv.pipeline.training.paired import fmt_interval
from collectivekv.pipeline.training.quality_report import add_quality, quality_md, split_line

if TYPE_CHECKING:
    from collectivekv.pipeline.training.zoo_eval_plan import EvalReport


def _stats(vals: list[float]) -> dict[str, float]:
    a = np.asarray(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def summarise(rep: EvalReport) -> dict[str, Any]:
    s = rep.settings
    sections: dict[str, list[dict[str, Any]]] = {}
    pending: list[str] = []
    for row in rep.rows:
        recs = [rep.records[i] for i in rep.row_runs[(row.section, row.arch, row.label)] if i in rep.records]
        if not recs:  # report-only over an unfinished evaluation
            pending.append(f"{row.section}: {row.arch} {row.label}")
            continue
        entry: dict[str, Any] = {
            "label": row.label,
            "arch": row.arch,
            "x": row.x,
            "runs": [r["id"] for r in recs],
            "seeds": [r["seed"] for r in recs],
        }
        for m in METRICS:
            entry[m] = _stats([r["test"][m] for r in recs])
            entry[f"valid_{m}"] = _stats([r["valid"][m] for r in recs])
        entry["cr"] = _stats([r["cr"] for r in recs])
        entry["d_user"] = sorted({r["config"]["collective"]["d_user"] for r in recs})
        entry["kv_mode"] = recs[0]["config"]["kv_mode"]
        entry["train_seconds"] = _stats([r["train_seconds"] for r in recs])
        entry["best_epoch"] = [r["best_epoch"] for r in recs]
        sections.setdefault(row.section, []).append(entry)
    for entries in sections.values():
        add_quality(entries, rep.records, rep.users)
    auto_cmp = None
    if sections.get("auto") and any(e["x"] is not None for e in sections.get("fig4", [])):
        sweep = [e for e in sections["fig4"] if e["x"] is not None]
        best_test = max(sweep, key=lambda e: e["gauc"]["mean"])
        best_valid = max(sweep, key=lambda e: e["valid_gauc"]["mean"])
        a = sections["auto"][0]
        auto_cmp = {
            "arch": a["arch"],
            "auto_d_user": a["d_user"],
            "auto_gauc": a["gauc"],
            "choices": rep.auto.get(a["arch"], {}),
            "best_fixed_by_test": {"d_user": best_test["x"], "gauc": best_test["gauc"]},
            "best_fixed_by_valid": {"d_user": best_valid["x"], "gauc": best_valid["gauc"]},
            "gap_to_best_test": a["gauc"]["mean"] - best_test["gauc"]["mean"],
        }
    settings = {**asdict(s), "base": config_to_dict(s.base),
                "retrieval_keys": s.base.retrieval_keys}  # not in the din base's dict
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": ", ".join(sorted({r.get("device", rep.trained_on or s.train.device)
                                        for r in rep.records.values()})) or s.train.device,
        },
        "data": rep.data,
        "sections": sections,
        "pending": pending,
        "auto_vs_fixed": auto_cmp,
        "n_runs": len(rep.records),
        "train_seconds_total": round(sum(r["wall_seconds"] for r in rep.records.values()), 1),
    }


SECTION_TITLES = {"table1": "Table 1", "table3": "Table 3", "table4": "Table 4", "fig4": "Figure 4",
                  "fig5": "Figure 5", "auto": "auto d_u"}


def _label(section: str, e: dict[str, Any]) -> str:
    return f"{SECTION_TITLES[section]} {e['arch'].upper()} {e['label']}"


def _pm(st: dict[str, float], digits: int = 4) -> str:
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def _seeds(e: dict[str, Any], n_seeds: int) -> str:
    """" (n=2)" when a row has fewer finished seeds than planned (report-only on a partial run)."""
    return "" if len(e["seeds"]) == n_seeds else f" (n={len(e['seeds'])})"


def _training_line(st: dict[str, Any]) -> str:
    """Training settings every run shares (records of older versions may lack some keys)."""
    tr, base = st.get("train", {}), st.get("base", {})
    col = base.get("collective", {})
    return (f"Training: ≤ {tr.get('epochs')} epochs, patience {tr.get('patience')}, lr {tr.get('lr')}, "
            f"batch {tr.get('batch_size')}, weight decay {tr.get('weight_decay', 0.0)}, MLP dropout "
            f"{base.get('dropout', 0.0)}; collective runs: pool {col.get('pool_size')}, router loss weights "
            f"peak {col.get('peak_weight')} / balance {col.get('balance_weight')} (Table 3 varies them)."
            + (f" Per-event features in every run's behaviour token: {', '.join(base['event_features'])} (gap "
               f"buckets {base.get('gap_buckets', 16)}; model/events.py)." if base.get("event_features") else ""))


def _cached_parts(base: dict[str, Any]) -> str:
    """What a collective run caches per behaviour besides the retrieval keys, from the base config's options."""
    parts = "int8 user parts" if base.get("user_dtype") == "int8" else "fp16 user parts"
    index = "one uint16 router index for K and V" if base.get("kv_index") == "joint" else "uint16 router indices"
    return f"{parts} + {index} + the model's retrieval keys, if it caches any"


def markdown(res: dict[str, Any]) -> str:
    sec = res["sections"]
    st = res["settings"]
    n_seeds = len(st["seeds"])
    lines = [
        f"# CollectiveKV model zoo evaluation ({'QUICK SMOKE RUN: tiny dims, not results' if st['quick'] else 'full'})",
        "",
        f"Test split, mean ± std over {n_seeds} seed(s) {tuple(st['seeds'])}; device {res['machine']['device']}; "
        f"{res['n_runs']} runs, {res['train_seconds_total']:.0f} s of training+eval in all. "
        "CR = cache entry bytes ÷ the full model's fp32 K/V bytes for a user with a full window "
        f"(collective: {_cached_parts(st.get('base', {}))})."
        + (f" Samples: a random {st['sample_fraction']:.0%} of each split." if st["sample_fraction"] < 1 else ""),
        "",
        _training_line(st),
        "",
        *([split_line(res["data"]), ""] if split_line(res.get("data", {})) else []),
        *([f"Command: `{res.get('trained_by') or res['command']}`", ""] if res.get("command") else []),
        *([f"Report rendered from its finished runs by: `{res['command']}`", ""] if res.get("trained_by") else []),
    ]
    if "table1" in sec:
        lines += _table1(sec["table1"], st["models"], n_seeds)
    for key, title in (("table3", "Table 3 — router-loss ablation"), ("table4", "Table 4 — sharing K / V / both")):
        if key in sec:
            arch = sec[key][0]["arch"].upper()
            lines += [f"## {title} ({arch})", "", "| variant | GAUC | AUC | Logloss | CR |", "|---|---|---|---|---|"]
            lines += _variant_rows(sec[key], n_seeds)
    for key, title, png in (
        ("fig4", "Figure 4 — GAUC vs d_u", "fig4_d_user.png"),
        ("fig5", "Figure 5 — GAUC vs pool size", "fig5_pool.png"),
    ):
        if key in sec:
            arch = sec[key][0]["arch"].upper()
            lines += [
                f"## {title} ({arch}; plot `{png}`)",
                "",
                "| setting | GAUC | AUC | Logloss | CR |",
                "|---|---|---|---|---|",
            ]
            lines += _variant_rows(sec[key], n_seeds)
    if res.get("auto_vs_fixed"):
        lines += _auto_vs_fixed(res["auto_vs_fixed"])
    lines += quality_md([(_label(key, e), e) for key in SECTION_TITLES for e in sec.get(key, [])])
    if res.get("pending"):
        lines += ["## Pending (not run yet: rerun `ckv eval` with the same options to train them)", "",
                  *[f"- {p}" for p in res["pending"]], ""]
    return "\n".join(lines)


def _table1(entries: list[dict[str, Any]], models: list[str], n_seeds: int) -> list[str]:
    """Table 1's section: full KV vs CollectiveKV per model, the collective's GAUC gain over the full."""
    lines = [
        "## Table 1 — full KV vs CollectiveKV",
        "",
        "| model | variant | d_u | GAUC | AUC | Logloss | CR | Δ GAUC (coll − full) | paired Δ [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in models:
        ent = {e["label"]: e for e in entries if e["arch"] == arch}
        for label in ("full", "collective"):
            e = ent.get(label)
            if e is None:
                lines.append(f"| {arch.upper()} | {label} | | pending (not run yet) | | | | | |")
                continue
            delta = ""
            if label == "collective" and "full" in ent:
                d = e["gauc"]["mean"] - ent["full"]["gauc"]["mean"]
                delta = f"{d:+.4f} ({'≥' if d >= 0 else '<'} full)"
            cr = "/" if label == "full" else f"{100 * e['cr']['mean']:.2f}%"
            lines.append(
                f"| {arch.upper()} | {label} | {'/' if label == 'full' else ','.join(map(str, e['d_user']))}"
                f" | {_pm(e['gauc'])}{_seeds(e, n_seeds)} | {_pm(e['auc'])} | {_pm(e['logloss'])} | {cr}"
                f" | {delta} | {fmt_interval((e.get('paired') or {}).get('pooled')) if label != 'full' else ''} |"
            )
    return [*lines, ""]


def _variant_rows(entries: list[dict[str, Any]], n_seeds: int) -> list[str]:
    """One table row per variant (label, GAUC, AUC, Logloss, CR), then a blank line."""
    lines = []
    for e in entries:
        cr = "/" if e["kv_mode"] == "full" else f"{100 * e['cr']['mean']:.2f}%"
        lines.append(f"| {e['label']} | {_pm(e['gauc'])}{_seeds(e, n_seeds)} | {_pm(e['auc'])} | "
                     f"{_pm(e['logloss'])} | {cr} |")
    return [*lines, ""]


def _auto_vs_fixed(a: dict[str, Any]) -> list[str]:
    """The `--d-user auto` section: each seed's choice against the best fixed d_u."""
    ch = "; ".join(
        f"seed {s}: d_u {c['d_user']} (spectral {c['spectral']}, CR cap {c['cr_cap']})"
        for s, c in sorted(a["choices"].items(), key=lambda kv: int(kv[0]))
    )
    return [
        "## `--d-user auto` vs the best fixed d_u",
        "",
        f"{a['arch'].upper()}: auto chose {ch}. Auto GAUC {_pm(a['auto_gauc'])}; best fixed d_u by test GAUC: "
        f"{a['best_fixed_by_test']['d_user']} ({_pm(a['best_fixed_by_test']['gauc'])}); by validation GAUC: "
        f"{a['best_fixed_by_valid']['d_user']} ({_pm(a['best_fixed_by_valid']['gauc'])}); auto − best (test): "
        f"{a['gap_to_best_test']:+.4f}.",
        "",
    ]


def plot_sweep(res: dict[str, Any], key: str, path: Path, xlabel: str, log_x: bool) -> None:
    """GAUC (mean ± std) of a sweep, its quadratic fit (in log x) and the full-KV baseline band."""
    if not any(e["x"] is not None for e in res["sections"].get(key, [])):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = res["sections"][key]
    sweep = sorted((e for e in entries if e["x"] is not None), key=lambda e: e["x"])
    full = next((e for e in entries if e["x"] is None), None)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = np.array([e["x"] for e in sweep], dtype=float)
    ys = np.array([e["gauc"]["mean"] for e in sweep])
    ax.errorbar(
        xs, ys, yerr=[e["gauc"]["std"] for e in sweep], fmt="o", color="tab:blue", capsize=3, label="CollectiveKV"
    )
    if len(xs) >= 3:
        t = np.log(xs) if log_x else xs
        coef = np.polyfit(t, ys, 2)
        grid = np.linspace(t.min(), t.max(), 100)
        ax.plot(
            np.exp(grid) if log_x else grid,
            np.polyval(coef, grid),
            "--",
            color="tab:blue",
            alpha=0.6,
            label="quadratic fit",
        )
    if full is not None:
        m, sd = full["gauc"]["mean"], full["gauc"]["std"]
        ax.axhline(m, color="tab:gray", label="full KV")
        ax.axhspan(m - sd, m + sd, color="tab:gray", alpha=0.15)
    for e in sweep:
        if e["kv_mode"] == "collective":
            ax.annotate(
                f"{100 * e['cr']['mean']:.2g}%",
                (e["x"], e["gauc"]["mean"]),
                fontsize=6,
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
            )
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [f"{int(x):,}" for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test GAUC (mean ± std, {len(res['settings']['seeds'])} seed(s))")
    arch = entries[0]["arch"].upper()
    quick = " — quick smoke run" if res["settings"]["quick"] else ""
    ax.set_title(f"{arch}, MovieLens{quick} (labels: CR)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
