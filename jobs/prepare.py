"""`ckv data prepare`: event log (+ item genres) -> canonical dataset (pipeline/data/dataset_schema.py).

Defaults are MovieLens' column names and click rule (rating >= 4), so
`ckv data prepare --events data/movielens/ratings.csv --items data/movielens/movies.csv --out DIR`
prepares the bundled data. This module only parses arguments; pipeline/data/prepare.py does the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

DEFAULT_RATING_COL = "rating"
DEFAULT_RATING_THRESHOLD = 4.0


@click.group()
def data() -> None:
    """Data preparation."""


@data.command("prepare")
@click.option(
    "--events",
    "events",
    required=True,
    type=click.Path(path_type=Path),
    help="Event log, .csv/.csv.gz/.parquet: one row per interaction.",
)
@click.option(
    "--items",
    "items",
    type=click.Path(path_type=Path),
    default=None,
    help="Optional item side-feature file (.csv/.parquet), e.g. MovieLens movies.csv.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory: new, empty, or a dataset to replace with --overwrite (never anything else).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out (atomically, on success).")
@click.option("--user-col", default="userId", show_default=True, help="Events: user id column (integers).")
@click.option("--item-col", default="movieId", show_default=True, help="Events (and items file): item id column.")
@click.option("--time-col", default="timestamp", show_default=True, help="Events: timestamp column (integers).")
@click.option("--label-col", default=None, help="Events: 0/1 label column (instead of --rating-col).")
@click.option(
    "--rating-col",
    default=None,
    help=f"Events: rating column, label = rating >= threshold [default: {DEFAULT_RATING_COL} "
    "when --label-col is not given].",
)
@click.option(
    "--rating-threshold",
    type=float,
    default=None,
    help=f"Ratings at or above this are positives [default: {DEFAULT_RATING_THRESHOLD:g}].",
)
@click.option("--items-item-col", default=None, help="Items file: item id column [default: --item-col].")
@click.option("--item-feature-col", default="genres", show_default=True, help="Items file: multi-valued genre column.")
@click.option("--feature-sep", default="|", show_default=True, help="Separator of the genre values.")
@click.option(
    "--valid-frac", type=float, default=0.1, show_default=True, help="Fraction of events (by time) for valid."
)
@click.option("--test-frac", type=float, default=0.1, show_default=True, help="Fraction of events (by time) for test.")
@click.option(
    "--catalogue",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Item catalogue to extend (known items keep their dense ids): a catalogue.parquet, a prepared "
    "dataset or a checkpoint directory [default: the one of the dataset already at --out, if any].",
)
@click.option("--new-catalogue", is_flag=True, help="Start a fresh item catalogue (dense ids by ascending raw id).")
def prepare_cmd(events: Path, out: Path, overwrite: bool, **options: Any) -> None:
    """Validate an event log and write the canonical dataset (histories, items, time-split samples)."""
    from collectivekv.pipeline.data.dataset_schema import DataError
    from collectivekv.pipeline.data.prepare import prepare, summary
    from collectivekv.pipeline.store.safe_output import OutputError

    try:
        config = prepare_config(events, out, overwrite=overwrite, **options)
        meta = prepare(config)
    except (DataError, OutputError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"prepared {out}")
    click.echo(summary(meta))


def prepare_config(events: Path, out: Path, *, overwrite: bool = False, **options: Any) -> Any:
    """The :class:`pipeline.data.prepare.PrepareConfig` of `ckv data prepare`'s options (the column mapping,
    the split fractions, the catalogue choice); the one place the CLI builds it (`ckv refresh` too).

    The click rule defaults to rating >= 4 on ``rating`` when no --label-col is given."""
    from collectivekv.pipeline.data.prepare import PrepareConfig

    label_col, rating_col, threshold = options["label_col"], options["rating_col"], options["rating_threshold"]
    if label_col is not None and (rating_col is not None or threshold is not None):
        raise click.UsageError("give either --label-col or --rating-col/--rating-threshold, not both")
    if label_col is None:
        options["rating_col"] = rating_col or DEFAULT_RATING_COL
        options["rating_threshold"] = DEFAULT_RATING_THRESHOLD if threshold is None else threshold
    return PrepareConfig(events=events, out=out, overwrite=overwrite, **options)
