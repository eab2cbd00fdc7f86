"""`ckv analyze`: the paper's K/V and router analysis (Figures 1, 2, 6, 7, pool utilisation) for
checkpoints + histories (argument parsing only; pipeline/reports/analysis.py, pipeline/reports/analysis_plots.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("analyze")
@click.option("--checkpoint", "checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path),
              multiple=True, required=True,
              help="checkpoint directory; repeat for several (each gets its own file prefix)")
@click.option("--histories", type=click.Path(exists=True, path_type=Path), required=True,
              help="histories Parquet: a file, a directory of files, or a `ckv data prepare` dataset")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--users", "n_sample", type=click.IntRange(2, 5000), default=1000, show_default=True,
              help="sampled users for Figures 1, 2 and 7")
@click.option("--router-users", type=click.IntRange(1), default=100, show_default=True,
              help="users of the Figure 6 histogram")
@click.option("--svd-k", "k", type=click.IntRange(1), default=2, show_default=True,
              help="principal components of Figure 2")
@click.option("--max-users", type=click.IntRange(2), default=None,
              help="analyse a seeded sample of this many users instead of all (utilisation is over them)")
@click.option("--seed", type=int, default=0, show_default=True)
def analyze(checkpoints: tuple[Path, ...], histories: Path, out_dir: Path, n_sample: int, router_users: int, k: int,
            max_users: int | None, seed: int) -> None:
    """Write PNGs + analysis.json to OUT: cross-user K/V similarity, principal vs residual, router
    activations, similar users' overlap, pool utilisation."""
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.pipeline.reports.analysis_plots import run_analysis

    results = []
    names = [c.name for c in checkpoints]
    for i, ckpt in enumerate(checkpoints):  # two checkpoints named alike (run1/ckpt, run2/ckpt): numbered files
        prefix = "" if len(names) == 1 else f"{ckpt.name}_" if names.count(ckpt.name) == 1 else f"{i}_{ckpt.name}_"
        try:
            r = run_analysis(ckpt, histories, out_dir, n_sample=n_sample, n_router_users=router_users, k=k, seed=seed,
                             max_users=max_users, prefix=prefix)
        except (CheckpointError, ValueError, FileNotFoundError, KeyError) as exc:
            raise click.ClickException(f"{ckpt}: {exc}") from exc
        results.append(r)
        click.echo(f"{ckpt}: wrote {out_dir / (prefix + 'analysis.json')} and {len(r['figures'])} PNGs", err=True)
    click.echo(json.dumps([{k: r[k] for k in ("checkpoint", "model_version", "fig1", "router")} for r in results],
                          indent=2, default=float))
