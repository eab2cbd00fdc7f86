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
from collectivekv.pipeline.data.events import read_events, read_item_genres
from collectivekv.pipeline.store.safe_output import OutputKind, check_output_dir, replace_dir

DATASET_OUTPUT = OutputKind("dataset", "ckv data prepare",
                            frozenset({META_FILE, ITEMS_FILE, HISTORIES_FILE, SAMPLES_DIR, CATALOGUE_FILE}),
                            signature=(META_FILE, HISTORIES_FILE))


@dataclass(frozen=True)
class PrepareConfig:
    """Inputs, column names and split fractions of `ckv data prepare`.

    Exactly one of `label_col` (0/1 values) or `rating_col` (label = rating >= rating_threshold)
    must be set. `items_item_col` defaults to `item_col`.
    """

    events: Path
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
    valid_frac: float = 0.1
    test_frac: float = 0.1
    catalogue: Path | None = None  # previous catalogue: a catalogue.parquet, a dataset or a checkpoint dir
    new_catalogue: bool = False  # start a fresh catalogue even if `out` holds one
    overwrite: bool = False  # replace an existing dataset at `out` (never anything else)

    def __post_init__(self) -> None:
        if self.catalogue is not None and self.new_catalogue:
            raise DataError("give either a previous catalogue (--catalogue) or --new-catalogue, not both")
        if not (0 <= self.valid_frac < 1 and 0 <= self.test_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise DataError(f"split fractions valid={self.valid_frac}, test={self.test_frac}: need 0 <= each, sum < 1")

    @property
    def event_columns(self) -> dict[str, Any]:
        """The event log's column mapping (:func:`pipeline.data.events.read_events`'s keywords)."""
        return {"user_col": self.user_col, "item_col": self.item_col, "time_col": self.time_col,
                "label_col": self.label_col, "rating_col": self.rating_col, "rating_threshold": self.rating_threshold}

    @property
    def item_columns(self) -> dict[str, Any]:
        """The item file's column mapping (:func:`pipeline.data.events.read_item_genres`'s keywords)."""
        return {"item_col": self.items_item_col or self.item_col, "feature_col": self.item_feature_col,
                "sep": self.feature_sep}

    @property
    def label_rule(self) -> str:
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
    inputs = (config.events, config.items)
    check_output_dir(Path(config.out), DATASET_OUTPUT, overwrite=config.overwrite, inputs=inputs)
    events = read_events(config.events, **config.event_columns)
    pairs = None if config.items is None else read_item_genres(config.items, **config.item_columns)
    ds = build_dataset(events, pairs, valid_frac=config.valid_frac, test_frac=config.test_frac,
                       catalogue=previous_catalogue(config))
    ds.meta["label_rule"] = config.label_rule
    ds.meta["source"] = {
        "events": str(config.events),
        "items": None if config.items is None else str(config.items),
        "sha256": sha256_file(config.events),
    }
    validate_dataset(ds, where=f"prepared from {config.events}")
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
    lines.append(f"  valid_start {meta['splits']['valid_start']}  test_start {meta['splits']['test_start']}")
    cat = meta.get("catalogue")
    if cat:
        base = "a fresh catalogue" if cat["previous_sha256"] is None else f"extends {cat['previous_sha256'][:12]}"
        lines.append(f"  item catalogue {cat['sha256'][:12]}: {meta['n_items']:,} items, {cat['new_items']:,} new "
                     f"({base})")
    return "\n".join(lines)
