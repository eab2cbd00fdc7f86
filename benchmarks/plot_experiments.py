"""Plot GAUC (mean ± std over seeds) of `ckv experiment` result files side by side.

    python benchmarks/plot_experiments.py OUT.png results1.json [results2.json ...]

Each file contributes one group of bars (its variants), labelled by the file's stem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, files: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(files)), 4))
    colours = {"full": "tab:gray", "collective": "tab:blue", "share_k": "tab:orange", "share_v": "tab:green"}
    x = 0.0
    ticks, labels = [], []
    for f in files:
        summary = json.loads(Path(f).read_text())["summary"]
        start = x
        for name, s in summary.items():
            ax.bar(x, s["gauc"]["mean"], yerr=s["gauc"]["std"], width=0.8, color=colours.get(name, "tab:purple"),
                   label=name, capsize=3)  # fmt: skip
            ax.text(x, s["gauc"]["mean"] + s["gauc"]["std"] + 0.001, f"{100 * s['cr']:.2f}%", ha="center", fontsize=7)
            x += 1
        ticks.append((start + x - 1) / 2)
        labels.append(Path(f).stem)
        x += 0.8
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), loc="lower right")
    ax.set_xticks(ticks, labels, rotation=30, ha="right", fontsize=8)
    lo = min(b.get_height() for b in ax.patches)
    ax.set_ylim(lo - 0.02, None)
    ax.set_ylabel("test GAUC (mean ± std, 3 seeds)")
    ax.set_title("MovieLens ml-latest-small: full KV vs CollectiveKV (labels: CR)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
