"""Build the canonical dataset (pipeline/data/dataset_schema.py) from an event log: `ckv data prepare`.

`build_dataset` (pipeline/data/build.py) is pure: typed events (user, item, timestamp, label; input row
order) and optional (item, genre) pairs in, a CanonicalDataset out. `prepare` is the shell: read and
validate the inputs (pipeline/data/events.py), build, validate, and write atomically
(pipeline/store/safe_output.py: a temp directory beside OUT, then a rename; an existing dataset at OUT
is replaced only with `overwrite` and only on success; anything else at OUT is refused).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from collectivekv.cachestore.store.catalogue import CATALOGUE_FILE, ItemCatalogue, load_catalogue
from collectivekv.pipeline.data.build import build_dataset
from collectivekv.pipeline.data.dataset_schema import (
    HISTORIES_FILE,
    ITEMS_FILE,
    META_FILE,
    SAMPLES_DIR,
    SPLITS,
    CanonicalDataset,
    DataError,
    validate_dataset,
)
from collectivekv.pipeline.data.prepare_inputs import read_log, read_pairs, source_record
from collectivekv.pipeline.data.split import SPLIT_KINDS, split_kind
from collectivekv.pipeline.store.safe_output import OutputKind, check_output_dir, replace_dir

DATASET_OUTPUT = OutputKind("dataset", "ckv data prepare",
                            frozenset({META_FILE, ITEMS_FILE, HISTORIES_FILE, SAMPLES_DIR, CATALOGUE_FILE}),
                            signature=(META_FILE, HISTORIES_FILE), nested=(f"{SAMPLES_DIR}/*.parquet",))


@dataclass(frozen=True)
class PrepareConfig:
    """Inputs, column names and split of `ckv data prepare`.

    Exactly one of `events` (with exactly one of `label_col` (0/1 values) or `rating_col` (label =
    rating >= rating_threshold)) or `impressions` (+ `history`, pipeline/data/impressions.py) must be set.
    `items_item_col` defaults to `item_col`. Formats of the values: pipeline/data/event_values.py.
    """

    events: Path | None
    out: Path
    items: Path | None = None
    user_col: str = "userId"
    item_col: str = "movieId"
    time_col: str = "timestamp"
    label_col: str | None = None
    rating_col: str | None = None
    rating_threshold: float | None = None
    items_item_col: str | None = None
    item_feature_col: str = "genres"
    feature_sep: str = "|"
    valid_frac: float = 0.1  # global split: fraction of events (by time) for valid
    test_frac: float = 0.1
    split: str = "global"  # "global" (one time cut) or "per-user" (leave-last-k-out: pipeline/data/split.py)
    user_valid_events: int = 10  # per-user split: each user's events before the test ones for valid
    user_test_events: int = 10  # per-user split: each user's last events for test
    catalogue: Path | None = None  # previous catalogue: a catalogue.parquet, a dataset or a checkpoint dir
    new_catalogue: bool = False  # start a fresh catalogue even if `out` holds one
    overwrite: bool = False  # replace an existing dataset at `out` (never anything else)
    sep: str | None = None  # separator of every text input file [default: by extension]
    user_ids: str = "auto"  # auto | int | string (text ids, keyed by blake2b-63)
    item_ids: str = "auto"
    time_unit: str = "s"  # the unit of the timestamps (numbers are in it; dates / ISO times are converted to it)
    time_format: str | None = None  # strptime format of text times [default: numbers or ISO-8601]
    ignore_genres: tuple[str, ...] = ()  # placeholder genre values (besides "(no genres listed)")
    impressions: Path | None = None  # an impression log instead of `events`
    history: Path | None = None  # its read history
    shown_col: str = "shown"
    clicked_col: str = "clicked"
    labelled_impressions: bool = False  # the shown column holds item-label tokens ("N1-0 N7-1")
    list_sep: str = " "
    history_user_col: str | None = None  # [default: user_col]
    history_item_col: str | None = None  # [default: item_col]
    history_time_col: str | None = None  # [default: none: reads precede the earliest impression]

    def __post_init__(self) -> None:
        if (self.events is None) == (self.impressions is None):
            raise DataError("give either an event log (--events) or an impression log (--impressions)")
        if self.history is not None and self.impressions is None:
            raise DataError("--history is the read history of an impression log: give --impressions too")
        if self.impressions is not None and (self.label_col or self.rating_col):
            raise DataError("an impression log's labels come from its shown / clicked lists: drop --label-col / "
                            "--rating-col")
        if self.catalogue is not None and self.new_catalogue:
            raise DataError("give either a previous catalogue (--catalogue) or --new-catalogue, not both")
        if not (0 <= self.valid_frac < 1 and 0 <= self.test_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise DataError(f"split fractions valid={self.valid_frac}, test={self.test_frac}: need 0 <= each, sum < 1")
        if self.split not in SPLIT_KINDS:
            raise DataError(f"split {self.split!r}: expected one of {SPLIT_KINDS}")
        if self.user_valid_events < 1 or self.user_test_events < 1:
            raise DataError(f"per-user split: valid events {self.user_valid_events}, test events "
                            f"{self.user_test_events}: need >= 1 each")

    @property
    def event_columns(self) -> dict[str, Any]:
        """The event log's columns and value formats (:func:`pipeline.data.event_values.read_event_log`'s
        keywords, less the id modes the run resolves against the catalogue it extends)."""
        return {"user_col": self.user_col, "item_col": self.item_col, "time_col": self.time_col,
                "label_col": self.label_col, "rating_col": self.rating_col, "rating_threshold": self.rating_threshold,
                "sep": self.sep, "time_unit": self.time_unit, "time_format": self.time_format}

    @property
    def item_columns(self) -> dict[str, Any]:
        """The item file's columns (:func:`pipeline.data.event_values.read_genres`'s keywords, less the key)."""
        return {"item_col": self.items_item_col or self.item_col, "feature_col": self.item_feature_col,
                "sep": self.feature_sep, "file_sep": self.sep, "ignore": self.ignore_genres}

    @property
    def label_rule(self) -> str:
        if self.impressions is not None:
            from collectivekv.pipeline.data.prepare_inputs import impression_options

            return impression_options(self, self.user_ids, self.item_ids).label_rule
        if self.label_col is not None:
            return f"label = column '{self.label_col}' (0/1)"
        return f"label = 1 if column '{self.rating_col}' >= {self.rating_threshold} else 0"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_dataset(ds: CanonicalDataset, out: str | Path, *, overwrite: bool = False,
                  inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Write `ds` to `out` atomically (pipeline/store/safe_output.py): a temp dir beside it, then a rename.

    A non-empty `out` that is not a dataset, or that is / contains one of `inputs`, is refused
    (OutputError); an existing dataset is replaced only with `overwrite`, and only on success.
    """
    out = Path(out)
    with replace_dir(out, DATASET_OUTPUT, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / SAMPLES_DIR).mkdir()
        (tmp / META_FILE).write_text(json.dumps(ds.meta, indent=2) + "\n")
        pq.write_table(ds.items, tmp / ITEMS_FILE)
        pq.write_table(ds.histories, tmp / HISTORIES_FILE)
        if ds.catalogue is not None:
            ds.catalogue.save(tmp / CATALOGUE_FILE)
        for split in SPLITS:
            pq.write_table(ds.samples[split], tmp / SAMPLES_DIR / f"{split}.parquet")
    return out


def previous_catalogue(config: PrepareConfig) -> ItemCatalogue | None:
    """The catalogue this run extends: `config.catalogue`, else the one of the dataset already at
    `config.out` (if any), else None (a fresh one). A directory gives its catalogue.parquet; a
    schema_version 1 dataset dir the ids it used (items.raw_item, meta genres)."""
    if config.new_catalogue:
        return None
    src = config.catalogue
    if src is None:
        out = Path(config.out)
        if not ((out / CATALOGUE_FILE).is_file() or (out / META_FILE).is_file()):
            return None
        src = out
    src = Path(src)
    if src.is_file() or (src / CATALOGUE_FILE).is_file():
        return load_catalogue(src)
    if (src / META_FILE).is_file() and (src / ITEMS_FILE).is_file():
        meta = json.loads((src / META_FILE).read_text())
        items = pq.read_table(src / ITEMS_FILE, columns=["raw_item"])
        return ItemCatalogue(items["raw_item"].to_numpy(), tuple(meta.get("genres") or ()))
    raise DataError(f"--catalogue {src}: no {CATALOGUE_FILE} there (give a catalogue file, a prepared dataset or "
                    "a checkpoint directory, or --new-catalogue to start afresh)")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Read + validate the inputs, build the canonical dataset, write it to config.out; return meta.

    config.out is checked first (OutputError before any work: see write_dataset).
    """
    inputs = (config.events, config.items, config.impressions, config.history)
    check_output_dir(Path(config.out), DATASET_OUTPUT, overwrite=config.overwrite, inputs=inputs)
    previous = previous_catalogue(config)
    log = read_log(config, previous)  # events or impressions, ids keyed, times converted
    pairs = read_pairs(config, log)
    ds = build_dataset(log.events, pairs, valid_frac=config.valid_frac, test_frac=config.test_frac,
                       catalogue=previous, item_names=log.item_names, user_key=log.user_key, item_key=log.item_key,
                       split=config.split, per_user=(config.user_valid_events, config.user_test_events))
    ds.meta["label_rule"] = config.label_rule
    main_input = config.events if config.events is not None else config.impressions
    ds.meta["source"] = source_record(config, sha256_file(main_input))
    ds.meta["time"] = log.time
    validate_dataset(ds, where=f"prepared from {main_input}")
    write_dataset(ds, config.out, overwrite=config.overwrite, inputs=inputs)
    return ds.meta


def summary(meta: dict[str, Any]) -> str:
    """A few lines for the terminal: sizes, samples per split, positive rates."""
    c = meta["counts"]
    lines = [
        f"users {meta['n_users']:,}  items {meta['n_items']:,}  genres {meta['n_genres']}  "
        f"events {c['events']:,}  positive rate {c['positive_rate']:.3f}  ({meta['label_rule']})",
    ]
    for split in SPLITS:
        s = c[split]
        lines.append(
            f"  {split:<5} {s['samples']:>10,} samples  {s['users']:>8,} users  positive rate {s['positive_rate']:.3f}"
        )
    sp = meta["splits"]
    time = meta.get("time") or {}
    unit = f" ({time['unit']}, from {time['input']} column '{time['column']}')" if time else ""
    if split_kind(meta) == "global":
        lines.append(f"  global time split: valid_start {sp['valid_start']}  test_start {sp['test_start']}{unit}")
    elif split_kind(meta) == "source":
        lines.append(f"  split as the source's files: {', '.join(f'{k} {v}' for k, v in sp['files'].items())}")
        if time.get("rule"):
            lines.append(f"  timestamps {time['input']}: {time['rule']}")
    else:
        lines.append(f"  per-user split: each user's last {sp['test_events']} events test, the {sp['valid_events']} "
                     f"before valid (users with >= {sp['min_events']} events)")
    keys = [f"{what} ids keyed by {meta[k]}" for what, k in (("user", "user_key"), ("item", "item_key"))
            if meta.get(k, "int") != "int"]
    if keys:
        lines.append("  " + ", ".join(keys) + " (text ids)")
    cat = meta.get("catalogue")
    if cat:
        base = "a fresh catalogue" if cat["previous_sha256"] is None else f"extends {cat['previous_sha256'][:12]}"
        lines.append(f"  item catalogue {cat['sha256'][:12]}: {meta['n_items']:,} items, {cat['new_items']:,} new "
                     f"({base})")
    return "\n".join(lines)
