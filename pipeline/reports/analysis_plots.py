"""PNG plots of :mod:`pipeline.reports.analysis` results (matplotlib, Agg backend): Figures 1, 2, 6, 7 and the
pool utilisation curve. Each function takes an :class:`~pipeline.reports.analysis.Analysis` and a path."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from collectivekv.pipeline.reports.analysis import Analysis, kde  # noqa: E402

GRID = np.linspace(-1.0, 1.0, 401)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _density(ax: plt.Axes, values: np.ndarray, label: str, **kw: object) -> None:
    if len(values):
        ax.plot(GRID, kde(values, GRID), label=f"{label} (n={len(values):,})", **kw)


def plot_fig1(a: Analysis, path: str | os.PathLike, title: str = "") -> Path:
    """Figure 1: KDE of the cross-user cosine similarity of mean keys / values."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, ("K", "V"), strict=True):
        pairs, ref = a.arrays[f"mean_{name}_pairs"], a.arrays[f"mean_{name}_ref"]
        if len(pairs):
            ax.hist(pairs, bins=80, range=(-1, 1), density=True, alpha=0.25, color="C0")
        _density(ax, pairs, "all pairs", color="C0")
        _density(ax, ref, "one reference user vs all (paper)", color="C1", ls="--")
        ax.set_xlim(-1, 1)
        ax.set_xlabel(f"cosine similarity of mean {'keys' if name == 'K' else 'values'}")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(f"Figure 1: cross-user similarity of mean K / V — {a.summary['sampled_users']:,} users" +
                 (f" — {title}" if title else ""), fontsize=10)
    return _save(fig, path)


def plot_fig2(a: Analysis, path: str | os.PathLike, title: str = "") -> Path:
    """Figure 2: KDE of the cross-user similarity of the principal (top-k SVD) and residual parts."""
    k = a.summary["svd_k"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, ("K", "V"), strict=True):
        e = a.summary["fig2"][f"energy_top{k}_{name}"]
        _density(ax, a.arrays[f"principal_{name}_pairs"], f"principal (top {k})", color="C3")
        _density(ax, a.arrays[f"residual_{name}_pairs"], "residual", color="C2")
        ax.set_xlim(-1, 1)
        ax.set_xlabel(f"cosine similarity of mean {'principal / residual ' + name}")
        ax.set_ylabel("density")
        ax.set_title(f"{name}: top-{k} energy share median {e.get('median', float('nan')):.3f}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 2: principal vs residual K / V across users" + (f" — {title}" if title else ""), fontsize=10)
    return _save(fig, path)


def plot_fig6(a: Analysis, path: str | os.PathLike, title: str = "") -> Path | None:
    """Figure 6: histogram of router activation indices (bins of 50) over 100 random users."""
    names = [n for n in ("K", "V") if f"fig6_{n}" in a.arrays]
    if not names:
        return None
    r = a.summary["router"]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        h = a.arrays[f"fig6_{name}"]
        ax.bar(np.arange(len(h)) * r["hist_bin"], h, width=r["hist_bin"], align="edge", color="C0")
        ax.set_xlabel(f"{name} pool index (bins of {r['hist_bin']})")
        ax.set_ylabel("activations")
        ax.set_title(f"{name}: {int(h.sum()):,} behaviours, {int((h == 0).sum())}/{len(h)} bins empty", fontsize=9)
    fig.suptitle(f"Figure 6: router activations of {r['router_users']} random users" + (f" — {title}" if title else ""),
                 fontsize=10)
    return _save(fig, path)


def plot_fig7(a: Analysis, path: str | os.PathLike, title: str = "") -> Path | None:
    """Figure 7: index histograms (bins of 100) of the two most similar users."""
    names = [n for n in ("K", "V") if f"fig7_{n}_a" in a.arrays]
    if not names:
        return None
    r = a.summary["router"]
    f7 = r["fig7"]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ha, hb = a.arrays[f"fig7_{name}_a"], a.arrays[f"fig7_{name}_b"]
        x = np.arange(len(ha)) * r["pair_bin"]
        who = [f"user {u}" for u in f7["user_ids"]] if f7.get("user_ids") else [f"row {u}" for u in f7["user_rows"]]
        ax.bar(x, ha, width=r["pair_bin"], align="edge", alpha=0.55, label=who[0])
        ax.bar(x, hb, width=r["pair_bin"], align="edge", alpha=0.55, label=who[1])
        ov = f7[f"overlap_{name}"]
        ax.set_title(f"{name}: overlap (Jaccard) {ov['jaccard']:.3f}, |A∩B|/min {ov['overlap_coefficient']:.3f}",
                     fontsize=9)
        ax.set_xlabel(f"{name} pool index (bins of {r['pair_bin']})")
        ax.set_ylabel("activations")
        ax.legend(fontsize=8)
    fig.suptitle(f"Figure 7: the most similar pair of users (history cosine {f7['history_cosine']:.4f})"
                 + (f" — {title}" if title else ""), fontsize=10)
    return _save(fig, path)


def plot_utilisation(a: Analysis, path: str | os.PathLike, title: str = "") -> Path | None:
    """Pool rows sorted by usage (rank plot) with never-chosen share and normalised entropy."""
    names = [n for n in ("K", "V") if f"usage_{n}" in a.arrays]
    if not names:
        return None
    r = a.summary["router"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name in names:
        c = np.sort(a.arrays[f"usage_{name}"])[::-1]
        u = r[f"utilisation_{name}"]
        ax.plot(np.arange(1, len(c) + 1), np.maximum(c, 0.5), label=(
            f"{name}: {u['never_chosen_frac']:.1%} never chosen, entropy {u.get('entropy_normalised', 0):.3f}"))
    ax.set_yscale("log")
    ax.set_xlabel("pool row, by usage rank")
    ax.set_ylabel("behaviours routed (0 shown at 0.5)")
    ax.legend(fontsize=8)
    ax.set_title("Pool utilisation over all users" + (f" — {title}" if title else ""), fontsize=10)
    return _save(fig, path)


PLOTS = {"fig1_similarity": plot_fig1, "fig2_principal_residual": plot_fig2, "fig6_router_activations": plot_fig6,
         "fig7_similar_users": plot_fig7, "pool_utilisation": plot_utilisation}


def write_plots(a: Analysis, out_dir: str | os.PathLike, title: str = "", prefix: str = "") -> dict[str, str]:
    """Every plot that applies, as ``out_dir/<prefix><name>.png``; returns {name: path}."""
    out = {}
    for name, fn in PLOTS.items():
        p = fn(a, Path(out_dir) / f"{prefix}{name}.png", title)
        if p is not None:
            out[name] = str(p)
    return out


def run_analysis(checkpoint: str | os.PathLike, histories: str | os.PathLike, out_dir: str | os.PathLike, *,
                 n_sample: int = 1000, n_router_users: int = 100, k: int = 2, seed: int = 0,
                 max_users: int | None = None, prefix: str = "", title: str | None = None) -> dict:
    """``ckv analyze`` for one checkpoint: load it and the histories (last max_len window of each user's
    full history), analyse all users (or a seeded sample of ``max_users``), write the PNGs and
    ``<prefix>analysis.json`` under OUT_DIR; returns the JSON dict (with ``figures``: name → path)."""
    import json

    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.model.events import EventSpec
    from collectivekv.pipeline.data.history import HistoryIndex
    from collectivekv.pipeline.reports.analysis import analyze_model
    from collectivekv.pipeline.store.verify import history_dataset

    ckpt = load_checkpoint(checkpoint)
    events = EventSpec.of(ckpt.config)
    cols = ["user_id", "items", "labels", *(["timestamps"] if events.features else [])]
    index = HistoryIndex(history_dataset(histories).to_table(columns=cols), events)
    users = index.users
    if max_users is not None and max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    w = index.window(users, None, ckpt.config.max_len)
    a = analyze_model(ckpt.model, w.items, w.feedback, w.lengths, n_sample=n_sample, n_router_users=n_router_users,
                      k=k, seed=seed)
    label = title if title is not None else f"{ckpt.config.kv_mode} {ckpt.model_version}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": str(checkpoint), "model_version": ckpt.model_version, "histories": str(histories),
               "max_len": ckpt.config.max_len, "d_user": ckpt.config.collective.d_user, **a.summary}
    fig7 = (summary.get("router") or {}).get("fig7")
    if fig7 and fig7.get("user_rows"):
        fig7["user_ids"] = [int(users[r]) for r in fig7["user_rows"]]
    summary["figures"] = write_plots(a, out, label, prefix)
    (out / f"{prefix}analysis.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
