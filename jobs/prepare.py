"""`ckv data prepare`: event log (+ item genres) -> canonical dataset (pipeline/data/dataset_schema.py).

Defaults are MovieLens' column names and click rule (rating >= 4), so
`ckv data prepare --events data/movielens/ratings.csv --items data/movielens/movies.csv --out DIR`
prepares the bundled data; `--impressions FILE [--history FILE]` takes an impression log instead
(pipeline/data/impressions.py). `ckv data import --format fuxictr --source DIR --out DIR` converts a FuxiCTR /
LongCTR sequence dataset (pipeline/data/fuxictr_import.py); `ckv data synth --out DIR` writes the synthetic
scale-regime dataset (pipeline/data/synthetic_dataset.py). This module only parses arguments; the modules named
do the work.
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
@click.option("--split", type=click.Choice(["global", "per-user"]), default="global", show_default=True,
              help="global: one time cut for every user (--valid-frac/--test-frac); per-user: each user's last "
              "--user-test-events events are test, the --user-valid-events before them valid (leave-last-k-out).")
@click.option("--user-valid-events", type=int, default=10, show_default=True,
              help="--split per-user: valid events per user (a user with fewer than valid + test + 1 events: "
              "all train).")
@click.option("--user-test-events", type=int, default=10, show_default=True,
              help="--split per-user: test events per user (each user's last ones).")
@click.option(
    "--catalogue",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Item catalogue to extend (known items keep their dense ids): a catalogue.parquet, a prepared "
    "dataset or a checkpoint directory [default: the one of the dataset already at --out, if any].",
)
@click.option("--new-catalogue", is_flag=True, help="Start a fresh item catalogue (dense ids by ascending raw id).")
def prepare_cmd(events: Path | None, out: Path, overwrite: bool, **options: Any) -> None:
    """Validate an event log (or an impression log) and write the canonical dataset (histories, items,
    time-split samples)."""
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


def prepare_config(events: Path | None, out: Path, *, overwrite: bool = False, **options: Any) -> Any:
    """The :class:`pipeline.data.prepare.PrepareConfig` of `ckv data prepare`'s options (the inputs, column
    mapping and value formats, the split, the catalogue choice); the one place the CLI builds it
    (`ckv refresh` too).

    The click rule defaults to rating >= 4 on ``rating`` when neither --label-col nor --impressions is given."""
    from collectivekv.pipeline.data.prepare import PrepareConfig

    impressions = options.get("impressions")
    if (events is None) == (impressions is None):
        raise click.UsageError("give exactly one of --events and --impressions")
    label_col, rating_col, threshold = options["label_col"], options["rating_col"], options["rating_threshold"]
    if label_col is not None and (rating_col is not None or threshold is not None):
        raise click.UsageError("give either --label-col or --rating-col/--rating-threshold, not both")
    if impressions is not None and (label_col or rating_col or threshold is not None):
        raise click.UsageError("--impressions: labels come from the shown / clicked lists (no --label-col / "
                               "--rating-col)")
    if label_col is None and impressions is None:
        options["rating_col"] = rating_col or DEFAULT_RATING_COL
        options["rating_threshold"] = DEFAULT_RATING_THRESHOLD if threshold is None else threshold
    if "ignore_genres" in options:
        options["ignore_genres"] = tuple(options["ignore_genres"])
    return PrepareConfig(events=events, out=out, overwrite=overwrite, **options)


@data.command("import")
@click.option("--format", "fmt", type=click.Choice(["fuxictr"]), required=True,
              help="Source format: fuxictr (FuxiCTR / LongCTR sequence data: MicroVideo, KuaiVideo, EBNeRD).")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Dataset directory: train, valid, test, user_info, item_info (.parquet, or .csv).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output directory: new, empty, or a dataset to replace with --overwrite (never anything else).")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out (atomically, on success).")
@click.option("--user-col", default="user_index", show_default=True, help="Sample files: user index column.")
@click.option("--item-col", default="item_index", show_default=True,
              help="Sample files and item_info: item index column.")
@click.option("--seq-len-col", default="seq_len", show_default=True,
              help="Sample files: how many items of the user's sequence the row sees.")
@click.option("--label-col", default=None,
              help="Sample files: 0/1 label column [default: the first of is_click, click, label, clk there].")
@click.option("--sequence-col", default="full_item_seq", show_default=True,
              help="user_info: the behaviour sequence column (item indices, oldest first, 0 = padding).")
@click.option("--item-feature-col", default="auto", show_default=True,
              help="item_info: categorical (or list) column whose values become genres; auto: cate_id if "
              "present; none: no genres.")
@click.option("--ignore-genre", "ignore_genres", multiple=True,
              help="A genre value meaning none, besides 0 (FuxiCTR's padding index); repeatable.")
@click.option("--list-sep", default="^", show_default=True, help="Separator of list cells in .csv files.")
@click.option("--sep", default=None, help="Separator of the .csv files [default: comma].")
def import_cmd(fmt: str, source: Path, out: Path, overwrite: bool, item_feature_col: str,
               ignore_genres: tuple[str, ...], **columns: Any) -> None:
    """Convert a FuxiCTR / LongCTR sequence dataset into the canonical dataset (histories from user_info's
    sequences, samples from the train / valid / test files, kept in their splits)."""
    from collectivekv.pipeline.data.dataset_schema import DataError
    from collectivekv.pipeline.data.fuxictr_import import FuxiCTRImportConfig, import_fuxictr
    from collectivekv.pipeline.data.prepare import summary
    from collectivekv.pipeline.store.safe_output import OutputError

    feature = None if item_feature_col.lower() == "none" else item_feature_col
    try:
        config = FuxiCTRImportConfig(source=source, out=out, overwrite=overwrite, item_feature_col=feature,
                                     ignore_genres=tuple(ignore_genres), **columns)
        meta = import_fuxictr(config)
    except (DataError, OutputError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"imported {source} ({fmt}) into {out}")
    click.echo(summary(meta))


@data.command("synth")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory: new, empty, or a dataset to replace with --overwrite (never anything else).")
@click.option("--users", type=int, default=22_000, show_default=True,
              help="Users (the default gives ~12M interactions at --max-len 1000).")
@click.option("--items", type=int, default=100_000, show_default=True, help="Items (raw ids 1..N).")
@click.option("--clusters", type=int, default=32, show_default=True,
              help="Taste clusters = genres (at most 62: SIM's category bitmask).")
@click.option("--max-len", type=int, default=1000, show_default=True,
              help="Longest history; lengths are log-normal with median max-len / 2.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out (atomically, on success).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def synth_cmd(out: Path, overwrite: bool, progress: bool, **options: Any) -> None:
    """Generate the synthetic scale-regime dataset (taste clusters, shared item transitions, a learnable
    click model; docs/data_schema.md) and write it as a canonical dataset."""
    from collectivekv.pipeline.data.dataset_schema import DataError
    from collectivekv.pipeline.data.prepare import summary
    from collectivekv.pipeline.data.synthetic_ctr import SynthConfig
    from collectivekv.pipeline.data.synthetic_dataset import synth_dataset
    from collectivekv.pipeline.store.safe_output import OutputError

    try:
        meta = synth_dataset(SynthConfig(**options), out, overwrite=overwrite, progress=progress)
    except (DataError, OutputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"synthesised {out}")
    click.echo(summary(meta))
    bayes = meta["source"]["synthetic"]["bayes"]["test"]
    click.echo(f"  Bayes-optimal test AUC {bayes['auc']:.4f}  GAUC {bayes['gauc']:.4f}  logloss {bayes['logloss']:.4f} "
               "(the planted probabilities: the ceiling of any model)")
