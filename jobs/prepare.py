"""`ckv data prepare`: event log (+ item genres) -> canonical dataset (pipeline/dataset_schema.py).

Defaults are MovieLens' column names and click rule (rating >= 4), so
`ckv data prepare --events data/movielens/ratings.csv --items data/movielens/movies.csv --out DIR`
prepares the bundled data; `--impressions FILE [--history FILE]` takes an impression log instead
(pipeline/impressions.py). This module only parses arguments; pipeline/prepare.py does the work.
"""

from __future__ import annotations

from pathlib import Path

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
    type=click.Path(path_type=Path),
    default=None,
    help="Event log, .csv/.tsv/.inter/.parquet (or any text file with --sep): one row per interaction.",
)
@click.option(
    "--impressions",
    type=click.Path(path_type=Path),
    default=None,
    help="Impression log instead of --events: one row per impression with the shown and the clicked item ids.",
)
@click.option(
    "--history",
    type=click.Path(path_type=Path),
    default=None,
    help="The impression log's read history: user, item id(s) [, time]; every read is a positive.",
)
@click.option(
    "--items",
    "items",
    type=click.Path(path_type=Path),
    default=None,
    help="Optional item side-feature file (same formats as --events), e.g. MovieLens movies.csv.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory: new, empty, or a dataset to replace with --overwrite (never anything else).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out (atomically, on success).")
@click.option("--sep", default=None, help="Separator of the text input files (one character, or tab / comma / "
              "semicolon / pipe / space) [default: by extension: .csv comma, .tsv/.inter/.item tab].")
@click.option("--user-col", default="userId", show_default=True, help="Events / impressions: user id column.")
@click.option("--item-col", default="movieId", show_default=True, help="Events (and items file): item id column.")
@click.option("--time-col", default="timestamp", show_default=True,
              help="Events / impressions: time column (numbers, ISO-8601 text, dates or Parquet timestamps).")
@click.option("--user-ids", type=click.Choice(["auto", "int", "string"]), default="auto", show_default=True,
              help="User ids: integers (their own keys) or text (hashes, UUIDs: keyed by blake2b-63); auto: the "
              "extended catalogue's choice, else text if any id is not a number.")
@click.option("--item-ids", type=click.Choice(["auto", "int", "string"]), default="auto", show_default=True,
              help="Item ids: integers or text (kept in the item catalogue); auto as for --user-ids.")
@click.option("--time-unit", type=click.Choice(["s", "ms", "us", "ns"]), default="s", show_default=True,
              help="Unit of the timestamps: numeric times are in it; dates and ISO-8601 / --time-format times are "
              "converted to it (since 1970-01-01 UTC).")
@click.option("--time-format", default=None,
              help="strptime format of text times that are not ISO-8601, e.g. '%m/%d/%Y %I:%M:%S %p'.")
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
@click.option("--ignore-genre", "ignore_genres", multiple=True,
              help="A placeholder genre value to drop, e.g. unknown (repeatable; case-insensitive; "
              "'(no genres listed)' always).")
@click.option("--shown-col", default="shown", show_default=True, help="Impressions: the shown item ids column.")
@click.option("--clicked-col", default="clicked", show_default=True, help="Impressions: the clicked item ids column.")
@click.option("--labelled-impressions", is_flag=True,
              help="Impressions: the shown column holds item-label tokens ('N1-0 N7-1', MIND); no clicked column.")
@click.option("--list-sep", default="space", show_default=True,
              help="Separator of the ids in a text list cell (impressions, history): text, or tab / comma / "
              "semicolon / pipe / space (any run of blanks); Parquet lists need none.")
@click.option("--history-user-col", default=None, help="History: user id column [default: --user-col].")
@click.option("--history-item-col", default=None, help="History: item id(s) column [default: --item-col].")
@click.option("--history-time-col", default=None,
              help="History: time column [default: none: reads precede the earliest impression].")
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
def prepare_cmd(
    events: Path | None,
    impressions: Path | None,
    history: Path | None,
    items: Path | None,
    out: Path,
    overwrite: bool,
    sep: str | None,
    user_col: str,
    item_col: str,
    time_col: str,
    user_ids: str,
    item_ids: str,
    time_unit: str,
    time_format: str | None,
    label_col: str | None,
    rating_col: str | None,
    rating_threshold: float | None,
    items_item_col: str | None,
    item_feature_col: str,
    feature_sep: str,
    ignore_genres: tuple[str, ...],
    shown_col: str,
    clicked_col: str,
    labelled_impressions: bool,
    list_sep: str,
    history_user_col: str | None,
    history_item_col: str | None,
    history_time_col: str | None,
    valid_frac: float,
    test_frac: float,
    catalogue: Path | None,
    new_catalogue: bool,
) -> None:
    """Validate an event log (or an impression log) and write the canonical dataset (histories, items,
    time-split samples)."""
    from pipeline.dataset_schema import DataError
    from pipeline.prepare import PrepareConfig, prepare, summary
    from pipeline.safe_output import OutputError

    if (events is None) == (impressions is None):
        raise click.UsageError("give exactly one of --events and --impressions")
    if label_col is not None and (rating_col is not None or rating_threshold is not None):
        raise click.UsageError("give either --label-col or --rating-col/--rating-threshold, not both")
    if impressions is not None and (label_col or rating_col or rating_threshold is not None):
        raise click.UsageError("--impressions: labels come from the shown / clicked lists (no --label-col / "
                               "--rating-col)")
    if label_col is None and impressions is None:
        rating_col = rating_col or DEFAULT_RATING_COL
        rating_threshold = DEFAULT_RATING_THRESHOLD if rating_threshold is None else rating_threshold
    try:
        config = PrepareConfig(
            events=events,
            out=out,
            items=items,
            user_col=user_col,
            item_col=item_col,
            time_col=time_col,
            label_col=label_col,
            rating_col=rating_col,
            rating_threshold=rating_threshold,
            items_item_col=items_item_col,
            item_feature_col=item_feature_col,
            feature_sep=feature_sep,
            valid_frac=valid_frac,
            test_frac=test_frac,
            catalogue=catalogue,
            new_catalogue=new_catalogue,
            overwrite=overwrite,
            sep=sep,
            user_ids=user_ids,
            item_ids=item_ids,
            time_unit=time_unit,
            time_format=time_format,
            ignore_genres=tuple(ignore_genres),
            impressions=impressions,
            history=history,
            shown_col=shown_col,
            clicked_col=clicked_col,
            labelled_impressions=labelled_impressions,
            list_sep=list_sep,
            history_user_col=history_user_col,
            history_item_col=history_item_col,
            history_time_col=history_time_col,
        )
        meta = prepare(config)
    except (DataError, OutputError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"prepared {out}")
    click.echo(summary(meta))
