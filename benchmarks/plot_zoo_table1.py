"""Table 1 of several `ckv eval` runs side by side: GAUC per model, full vs collective, per training recipe.

    python benchmarks/plot_zoo_table1.py OUT.png LABEL=results.json [LABEL=results.json ...]

Each ``results.json`` is what ``ckv eval`` (or ``ckv eval --report-only``) writes; its Table 1 rows give
one group of bars per (model, recipe): full KV and collective, mean ± std over seeds. Models missing
from a file are skipped there. Also prints a Markdown table comparing each recipe's collective GAUC
with the best full-KV GAUC over ALL the recipes given (the strict reading of "collective ≥ full").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ("sim", "eta", "sdim", "twin", "hstu", "din")


def table1(path: Path) -> dict[str, dict[str, dict]]:
    """{arch: {"full" | "collective": row}} of a results.json (rows with no finished run left out)."""
    rows = json.loads(path.read_text())["sections"].get("table1", [])
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row.get("gauc"):
            out.setdefault(row["arch"], {})[row["label"]] = row
    return out


def main(out: str, specs: list[str]) -> None:
    recipes = []
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            sys.exit(f"expected LABEL=results.json, got {spec!r}")
        recipes.append((label, table1(Path(path))))
    archs = [a for a in ORDER if any(a in t for _, t in recipes)]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(archs) * len(recipes) / 2), 4.2))
    x, ticks, names, seen = 0.0, [], [], set()
    shades = [0.35 + 0.65 * i / max(1, len(recipes) - 1) for i in range(len(recipes))]  # light → dark per recipe
    for arch in archs:
        start = x
        for (label, t), shade in zip(recipes, shades, strict=True):
            for kind, cmap in (("full", plt.cm.Greys), ("collective", plt.cm.Blues)):
                row = t.get(arch, {}).get(kind)
                if row is None:
                    continue
                name = f"{kind} ({label})"
                ax.bar(x, row["gauc"]["mean"], yerr=row["gauc"]["std"], width=0.8, capsize=3, color=cmap(shade),
                       label=None if name in seen else name)
                seen.add(name)
                x += 1
            x += 0.3
        ticks.append((start + x - 1.3) / 2)
        names.append(arch.upper())
        x += 1
    ax.set_xticks(ticks, names)
    lo = min(r["gauc"]["mean"] - r["gauc"]["std"] for _, t in recipes for v in t.values() for r in v.values())
    hi = max(r["gauc"]["mean"] + r["gauc"]["std"] for _, t in recipes for v in t.values() for r in v.values())
    ax.set_ylim(lo - 0.005, hi + 0.016)  # room for the legend above the bars
    ax.set_ylabel("test GAUC (mean ± std, 3 seeds)")
    ax.set_title("Table 1: full KV vs CollectiveKV per training recipe")
    ax.legend(fontsize=7, ncol=len(recipes), loc="upper center")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")
    print("| model | best full GAUC (recipe) | " + " | ".join(f"collective, {label}" for label, _ in recipes) + " |")
    print("|---|---|" + "---|" * len(recipes))
    for arch in archs:
        fulls = [(t[arch]["full"]["gauc"]["mean"], label) for label, t in recipes if "full" in t.get(arch, {})]
        best, where = max(fulls) if fulls else (float("nan"), "-")
        cells = []
        for _, t in recipes:
            row = t.get(arch, {}).get("collective")
            if row is None:
                cells.append("-")
                continue
            m, s, d = row["gauc"]["mean"], row["gauc"]["std"], row["gauc"]["mean"] - best
            cells.append(f"{m:.4f} ± {s:.4f} (d_u {row['d_user'][0]}, CR {100 * row['cr']['mean']:.2f}%, {d:+.4f})")
        print(f"| {arch.upper()} | {best:.4f} ({where}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
