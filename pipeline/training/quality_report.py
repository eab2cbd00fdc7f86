"""The paired comparisons, training diagnostics and validation curves of a report (`ckv eval`'s
results, `ckv experiment`'s): summaries over run records and Markdown lines. Pure formatting.

A run record (``TrainResult.metrics()``) holds ``seed``, ``history`` (one row per epoch: validation
metrics and, for collective runs, the per-epoch diagnostics) and ``diagnostics`` (end of training);
per-user GAUC parts (:class:`pipeline.training.paired.UserAUC`) are kept beside it by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from collectivekv.pipeline.training.paired import BOOT_SEED, N_BOOT, UserAUC, fmt_interval, paired_report

DIAG_KEYS = ("rows_used", "top1pct_share", "usage_entropy_norm", "router_entropy_norm", "router_max_prob",
             "gate_gap")  # fmt: skip
CURVE_KEYS = ("valid_gauc", "valid_auc", "valid_logloss", "router_entropy_norm", "gate_gap", "grad_rows")


def _stats(vals: Sequence[float]) -> dict[str, float]:
    a = np.asarray(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def paired_vs(a_recs: Sequence[dict[str, Any]], b_recs: Sequence[dict[str, Any]],
              users: dict[str, UserAUC]) -> dict[str, Any] | None:
    """A − B per seed and pooled (:func:`pipeline.training.paired.paired_report`) over the seeds whose runs
    on both sides have per-user parts (``users``: run id → parts); None when none do."""
    a = {r["seed"]: users[r["id"]] for r in a_recs if r["id"] in users}
    b = {r["seed"]: users[r["id"]] for r in b_recs if r["id"] in users}
    return paired_report(a, b)


def diagnostics_stats(recs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean ± std over seeds of the end-of-training diagnostics (and the last epoch's gradient rows)."""
    diags = [r["diagnostics"] for r in recs if r.get("diagnostics")]
    if not diags:
        return None
    out: dict[str, Any] = {k: _stats([d[k] for d in diags]) for k in DIAG_KEYS}
    grads = [d["grad_last_epoch"]["grad_rows"] for d in diags if d.get("grad_last_epoch")]
    out["grad_rows_last_epoch"] = _stats(grads) if grads else None
    out["n"] = len(diags)
    return out


def curve(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per epoch, the mean over the runs that trained it of each :data:`CURVE_KEYS` figure they record."""
    epochs = sorted({row["epoch"] for r in recs for row in r.get("history", [])})
    out = []
    for ep in epochs:
        rows = [row for r in recs for row in r.get("history", []) if row["epoch"] == ep]
        point: dict[str, Any] = {"epoch": ep, "runs": len(rows)}
        for k in CURVE_KEYS:
            vals = [row[k] for row in rows if k in row]
            if vals:
                point[k] = float(np.mean(vals))
        out.append(point)
    return out


def paired_md(rows: Sequence[tuple[str, dict[str, Any] | None]], baseline: str = "full") -> list[str]:
    """A table of paired differences: one row per (label, paired report)."""
    shown = [(label, p) for label, p in rows if p]
    if not shown:
        return []
    users = sorted({p["pooled"]["users"] for _, p in shown})
    lines = [
        f"## Paired GAUC difference (variant − {baseline}; same seed, same test samples)",
        "",
        f"Δ = Σ_u n_u (AUC_u − AUC_u^{baseline}) / Σ_u n_u over the test users with both labels "
        f"({', '.join(map(str, users))}); 95% interval: percentiles of {N_BOOT:,} bootstrap resamples of the "
        f"users (numpy generator seed {BOOT_SEED}); pooled: each user's difference averaged over the seeds, "
        "then resampled: that interval covers the sampling of users. Seeds and users: each resample also draws "
        "the seed pairs with replacement and averages their Δ over the drawn users (`pipeline/training/paired.py`), "
        "covering the training seeds too — coarse with few seeds.",
        "",
        "| variant | per seed: Δ [95% CI] | pooled Δ [95% CI over users] | resamples ≤ 0 "
        "| pooled Δ [95% CI over seeds and users] | resamples ≤ 0 |",
        "|---|---|---|---|---|---|",
    ]
    for label, p in shown:
        seeds = "; ".join(f"seed {x['seed']}: {fmt_interval(x)}" for x in p["per_seed"])
        pooled = p["pooled"]
        two = f"{pooled['two_level']['share_le_0']:.1%}" if "two_level" in pooled else "—"
        lines.append(f"| {label} | {seeds} | **{fmt_interval(pooled)}** | {pooled['share_le_0']:.1%} "
                     f"| {fmt_interval(pooled, two_level=True)} | {two} |")
    return [*lines, ""]


def diagnostics_md(rows: Sequence[tuple[str, dict[str, Any] | None, list[int]]]) -> list[str]:
    """A table of end-of-training diagnostics: one row per (label, diagnostics_stats, best epochs)."""
    shown = [r for r in rows if r[1]]
    if not shown:
        return []
    lines = [
        "## Training diagnostics (collective runs; end of training, mean ± std over seeds)",
        "",
        "Over every training sample's history (each behaviour of each window counts): rows used = fraction of "
        "pool rows that are the argmax of ≥ 1 behaviour; top-1% share = share of the behaviours routed to the "
        "most used 1% of rows; usage entropy and router entropy (mean entropy of softmax(router logits)) ÷ "
        "log(pool rows); max prob = mean top softmax probability; |1 − gate| = mean distance of the training "
        "gate sigmoid(top logit) from the inference gate 1; grad rows = fraction of pool rows with a "
        "non-zero gradient in ≥ 1 step of the last epoch trained. Means over the model's pools.",
        "",
        "| variant | rows used | top-1% share | usage entropy | router entropy | max prob | mean \\|1 − gate\\| "
        "| grad rows (last epoch) | best epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, d, best in shown:
        assert d is not None
        g = d.get("grad_rows_last_epoch")
        cells = [_pm(d[k], 3) for k in DIAG_KEYS] + [_pm(g, 3) if g else "—"]
        lines.append(f"| {label} | {' | '.join(cells)} | {', '.join(map(str, best))} |")
    return [*lines, ""]


def curves_md(rows: Sequence[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """Per-epoch validation GAUC (and, for collective runs, router entropy / |1 − gate| / grad rows)."""
    shown = [(label, c) for label, c in rows if c]
    if not shown:
        return []
    lines = ["## Per-epoch curves (mean over the seeds that trained the epoch)", "",
             "valid GAUC by epoch; collective runs also: router entropy (÷ log rows), mean |1 − gate| and grad "
             "rows of the epoch, on a fixed sample of training histories.", ""]  # fmt: skip
    for label, c in shown:
        gauc = ", ".join(f"{p['valid_gauc']:.4f}" for p in c)
        line = f"- {label}: valid GAUC {gauc}"
        if all("router_entropy_norm" in p for p in c):
            line += ("; router entropy " + ", ".join(f"{p['router_entropy_norm']:.3f}" for p in c)
                     + "; |1 − gate| " + ", ".join(f"{p['gate_gap']:.3f}" for p in c)
                     + "; grad rows " + ", ".join(f"{p['grad_rows']:.3f}" for p in c))
        lines.append(line)
    return [*lines, ""]


def _pm(st: dict[str, float], digits: int = 4) -> str:
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def add_quality(entries: list[dict[str, Any]], records: dict[str, dict[str, Any]], users: dict[str, UserAUC]) -> None:
    """Give each report entry (a row of runs, ``entry["runs"]`` = run ids, one per seed) its ``curve``,
    ``diagnostics`` and, unless it is a full-KV row, ``paired``: its difference from the full-KV row of
    the same model in the same list."""
    full = {e["arch"]: e for e in entries if e["kv_mode"] == "full"}
    for e in entries:
        recs = [records[i] for i in e["runs"] if i in records]
        e["curve"] = curve(recs)
        e["diagnostics"] = diagnostics_stats(recs)
        base = full.get(e["arch"])
        e["paired"] = (None if e["kv_mode"] == "full" or base is None else
                       paired_vs(recs, [records[i] for i in base["runs"] if i in records], users))


def quality_md(labelled: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The paired, diagnostics and curve sections for entries (label, entry with add_quality's fields)."""
    return (paired_md([(label, e.get("paired")) for label, e in labelled if e["kv_mode"] != "full"])
            + diagnostics_md([(label, e.get("diagnostics"), e.get("best_epoch", [])) for label, e in labelled])
            + curves_md([(label, e.get("curve", [])) for label, e in labelled]))


def split_line(data: dict[str, Any]) -> str:
    """One sentence on the dataset's split (``dataset_info``), or "" when unknown."""
    sp = data.get("splits") if data else None
    if not sp:
        return ""
    size = f"{data.get('test_samples') or 0:,} test samples from {data.get('test_users') or 0:,} users"
    if sp.get("kind") == "per-user":
        return (f"Split: per user (leave-last-k-out): each user's last {sp['test_events']} events are test, the "
                f"{sp['valid_events']} before them valid (users with ≥ {sp['min_events']} events); {size}.")
    if sp.get("kind") == "source":
        return f"Split: the source's own train / valid / test files (ckv data import); {size}."
    return f"Split: global time cut (test from {sp.get('test_start')}); {size}."
