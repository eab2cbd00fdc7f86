"""`ckv report size STORE [--baseline FULL_STORE] [--json]` (argument parsing only; pipeline/size_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def report() -> None:
    """Reports on published stores."""


@report.command("size")
@click.argument("store_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a full-KV store of the same users (ckv prefill --mode full)")
@click.option("--d-attn", type=int, default=None, help="attention dim, if the manifest lacks it")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of the table")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the JSON report to this file")
def size_cmd(store_root: Path, baseline: Path | None, d_attn: int | None, as_json: bool,
             json_out: Path | None) -> None:
    """Per-user and total bytes, and the compression rate (formula and measured) of STORE."""
    from pipeline.size_report import format_report, size_report

    try:
        rep = size_report(store_root, baseline, d_attn)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    text = json.dumps(rep, indent=2)
    if json_out is not None:
        json_out.write_text(text + "\n")
    click.echo(text if as_json else format_report(rep))
