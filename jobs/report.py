"""`ckv report size STORE [--baseline FULL_STORE] [--json]` (argument parsing only; pipeline/reports/size_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from collectivekv.jobs.capacity import DEFAULT_RESULTS_DIR


@click.group()
def report() -> None:
    """Reports on published stores."""


@report.command("size")
@click.argument("store_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a full-KV store of the same users (ckv prefill --mode full)")
@click.option("--d-attn", type=click.IntRange(min=1), default=None,
              help="attention dim d_a of a store whose manifest lacks it")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of the table")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the JSON report to this file")
def size_cmd(store_root: Path, baseline: Path | None, d_attn: int | None, as_json: bool,
             json_out: Path | None) -> None:
    """Per-user and total bytes, and the compression rate (formula and measured) of STORE."""
    from collectivekv.pipeline.reports.size_report import format_report, size_report

    try:
        rep = size_report(store_root, baseline, d_attn)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    text = json.dumps(rep, indent=2)
    if json_out is not None:
        json_out.write_text(text + "\n")
    click.echo(text if as_json else format_report(rep))


@report.command("html")
@click.argument("store_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="the checkpoint the store was prefilled with (analysis plots)")
@click.option("--histories", type=click.Path(exists=True, path_type=Path), default=None,
              help="histories for the analysis (default: the ones in the store's manifest)")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a full-KV store of the same users (size report ratios)")
@click.option("--baseline-checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a full-KV checkpoint: Figures 1-2 of the original K/V as well")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--project-users", type=int, default=100_000_000, show_default=True,
              help="user count of the capacity projection")
@click.option("--users", "analysis_users", type=click.IntRange(2, 5000), default=1000, show_default=True,
              help="sampled users of the analysis")
@click.option("--bandwidth", "bw_spec", default="measured", show_default=True, help="GB/s or 'measured'")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RESULTS_DIR,
              show_default=True, help="benchmark results directory (decode_latency/*.json etc.), read only")
def html_cmd(store_root: Path, checkpoint: Path, histories: Path | None, baseline: Path | None,
             baseline_checkpoint: Path | None, out: Path, project_users: int, analysis_users: int, bw_spec: str,
             results_dir: Path | None) -> None:
    """One self-contained HTML page: size report, capacity, latency results, analysis plots."""
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.pipeline.reports.html_report import build_report, write_report

    try:
        page = build_report(store_root, checkpoint, histories=histories, baseline=baseline,
                            baseline_checkpoint=baseline_checkpoint, results_dir=results_dir,
                            project_users=project_users, analysis_users=analysis_users, bandwidth_spec=bw_spec)
    except (FileNotFoundError, ValueError, KeyError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {write_report(out, page)} ({len(page) / 1e6:.1f} MB)")
