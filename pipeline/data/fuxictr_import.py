"""Import a FuxiCTR / LongCTR sequence dataset as the canonical dataset: `ckv data import --format fuxictr`.

Source layout (reczoo/LongCTR ``longctr_dataloader.py`` and its dataset configs, e.g.
``benchmark/DCNv2_microvideo1.7m_x2/*.yaml``; docs/data_schema.md, "Importing FuxiCTR / LongCTR datasets"):

    DIR/{train,valid,test}.parquet  one row per impression: user_index, item_index, seq_len (integers) and a
                                    0/1 label (is_click: MicroVideo, KuaiVideo; click: EBNeRD); other columns
                                    are ignored
    DIR/user_info.parquet           row u is user_index u: full_item_seq, the user's behaviour sequence of
                                    item indices, oldest first; 0 is padding
    DIR/item_info.parquet           row i is item_index i (row 0: the padding item): item_index and the item's
                                    side features (e.g. cate_id)

(``.csv`` in place of ``.parquet`` too: a list cell is text joined by ``list_sep``, FuxiCTR's ``^``.) LongCTR
gives a row the non-zero items of ``full_item_seq[:seq_len]`` (then the last max_len of them).

Mapping to the canonical dataset (pipeline/data/dataset_schema.py; history kind "sequence", split kind "source"):

    histories  user_id = user_index; items = full_item_seq without its 0s, in order (dense item id =
               item_index); labels 1 (the sequence holds the user's clicks); timestamps synthesised:
               0, 1, 2, ... (the behaviour's position)
    samples    one per source row, in its file's split: user_id, item_id = item_index, label,
               hist_len = the non-zero items of full_item_seq[:seq_len], timestamp = hist_len (the position
               of the next behaviour: the sample sees exactly items[:hist_len])
    items      a fresh catalogue: raw id = dense id = item_index 1..(rows of item_info) - 1; genres from
               ``item_feature_col`` (cate_id when item_info has it); 0 there (padding) means none
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from collectivekv.cachestore.store.catalogue import ItemCatalogue
from collectivekv.pipeline.data.build import build_items, build_samples, dataset_meta
from collectivekv.pipeline.data.dataset_schema import (
    HISTORIES_SCHEMA,
    SPLITS,
    CanonicalDataset,
    DataError,
    validate_dataset,
)
from collectivekv.pipeline.data.event_formats import first_bad, read_frame, read_header
from collectivekv.pipeline.data.event_values import read_genres
from collectivekv.pipeline.data.events import label_from_column, to_id
from collectivekv.pipeline.data.impressions import split_lists
from collectivekv.pipeline.data.prepare import DATASET_OUTPUT, sha256_file, write_dataset
from collectivekv.pipeline.store.safe_output import check_output_dir

SOURCE_FILES: tuple[str, ...] = (*SPLITS, "user_info", "item_info")
SOURCE_SUFFIXES: tuple[str, ...] = (".parquet", ".csv")
LABEL_COLUMNS: tuple[str, ...] = ("is_click", "click", "label", "clk")  # tried in order when no label_col
AUTO = "auto"
AUTO_GENRE_COL = "cate_id"  # MicroVideo's item category
PAD = 0  # FuxiCTR's padding index (sequences, categorical features)
TIME_RULE = "a behaviour's timestamp is its position in the user's sequence (0, 1, 2, ...); a sample's is its hist_len"


@dataclass(frozen=True)
class FuxiCTRImportConfig:
    """`ckv data import --format fuxictr`: the source directory, the output and the source's column names.

    ``label_col`` None: the first of LABEL_COLUMNS the train file has. ``item_feature_col``: item_info's
    categorical (or list) column whose values become genres; "auto": cate_id when item_info has it; None: none.
    """

    source: Path
    out: Path
    overwrite: bool = False
    user_col: str = "user_index"
    item_col: str = "item_index"
    seq_len_col: str = "seq_len"
    label_col: str | None = None
    sequence_col: str = "full_item_seq"
    item_feature_col: str | None = AUTO
    ignore_genres: tuple[str, ...] = ()  # genre values meaning "none", besides 0
    list_sep: str = "^"  # list cells of text files
    sep: str | None = None  # separator of text files [default: by extension]


@dataclass(frozen=True)
class Sequences:
    """user_info's sequences as stored: row u's items are ``values[offsets[u]:offsets[u + 1]]`` (0 = padding)."""

    offsets: np.ndarray  # (users + 1,) int64
    values: np.ndarray  # (stored items,) int64

    @property
    def n_rows(self) -> int:
        return len(self.offsets) - 1

    def non_empty(self) -> np.ndarray:
        """Rows (users) whose sequence holds a non-padding item, ascending."""
        row = np.repeat(np.arange(self.n_rows), np.diff(self.offsets))  # (stored,) the row of each item
        return np.unique(row[self.values != PAD])

    def visible(self, user: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        """(n,) the non-padding items among the first ``seq_len`` stored items of each ``user``'s sequence."""
        nonzero = np.concatenate([[0], np.cumsum(self.values != PAD)])  # (stored + 1,)
        start = self.offsets[user]
        return nonzero[start + seq_len] - nonzero[start]


def source_files(source: Path) -> dict[str, Path]:
    """name -> file of the source directory (``NAME.parquet``, else ``NAME.csv``), for every SOURCE_FILES name."""
    if not source.is_dir():
        raise DataError(f"--source {source}: not a directory (a FuxiCTR / LongCTR dataset directory holds "
                        f"{', '.join(f'{n}.parquet' for n in SOURCE_FILES)})")
    files = {}
    for name in SOURCE_FILES:
        found = [source / f"{name}{suffix}" for suffix in SOURCE_SUFFIXES if (source / f"{name}{suffix}").is_file()]
        if not found:
            raise DataError(f"--source {source}: no {name}.parquet (or {name}.csv); a FuxiCTR / LongCTR dataset "
                            f"directory holds {', '.join(SOURCE_FILES)}")
        files[name] = found[0]
    return files


def _where(path: Path, role: str, column: str, meaning: str) -> str:
    return f"{role} file {path}: column '{column}' ({meaning})"


def read_items(path: Path, config: FuxiCTRImportConfig) -> tuple[int, pd.DataFrame | None, str | None]:
    """(rows of item_info, its (item, genre) pairs or None, the genre column or None). Row i must hold
    item_index i: LongCTR reads item_info by row position."""
    raw = read_frame(path, {"item": config.item_col}, "item_info", sep=config.sep)
    where = _where(path, "item_info", config.item_col, "item index")
    index = to_id(raw["item"], where)
    moved = index != np.arange(len(index))
    if moved.any():
        raise DataError(f"{where}: row i must hold item_index i (LongCTR reads item_info by row position, 0 = "
                        f"padding); {int(moved.sum())} row(s) differ, {first_bad(moved, raw['item'])}")
    if len(index) < 2:
        raise DataError(f"{where}: {len(index)} row(s); row 0 is the padding item, so no item is left")
    genre_col = config.item_feature_col
    if genre_col == AUTO:
        genre_col = AUTO_GENRE_COL if AUTO_GENRE_COL in read_header(path, "item_info", config.sep) else None
    if genre_col is None:
        return len(index), None, None
    pairs = read_genres(path, item_col=config.item_col, feature_col=genre_col, sep=config.list_sep,
                        file_sep=config.sep, ignore=(str(PAD), *config.ignore_genres))
    return len(index), pairs, genre_col


def read_sequences(path: Path, config: FuxiCTRImportConfig, n_items: int) -> Sequences:
    """user_info's sequence column; every value an item index 0..n_items - 1 (DataError naming the row)."""
    raw = read_frame(path, {"seq": config.sequence_col}, "user_info", sep=config.sep)
    where = _where(path, "user_info", config.sequence_col, "item index sequence")
    flat = split_lists(raw["seq"], config.list_sep)  # one item per row, indexed by its user_info row
    numeric = pd.to_numeric(flat, errors="coerce")  # vectorised checks below; the raw values name a bad one
    values = to_id(flat if numeric.isna().any() else numeric, where) if len(flat) else np.zeros(0, np.int64)
    beyond = values >= n_items
    if beyond.any():
        raise DataError(f"{where}: {int(beyond.sum())} item index(es) beyond item_info's rows 0..{n_items - 1}, "
                        f"{first_bad(beyond, flat)}")
    lengths = np.bincount(np.asarray(flat.index, dtype=np.int64), minlength=len(raw))
    return Sequences(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), values)


def detect_label(path: Path, sep: str | None) -> str:
    """The first of LABEL_COLUMNS the file has; DataError listing its columns when it has none."""
    found = read_header(path, "train", sep)
    for name in LABEL_COLUMNS:
        if name in found:
            return name
    raise DataError(f"train file {path}: no label column among {list(LABEL_COLUMNS)}; give it with --label-col "
                    f"(columns found: {found[:50]})")


def read_split(path: Path, split: str, config: FuxiCTRImportConfig, label_col: str, seqs: Sequences,
               n_items: int) -> pd.DataFrame:
    """One split file as typed samples: user, item, label (int8), hist_len (the visible behaviours)."""
    cols = {"user": config.user_col, "item": config.item_col, "seq_len": config.seq_len_col, "label": label_col}
    raw = read_frame(path, cols, split, sep=config.sep)
    where = {m: _where(path, split, c, m) for m, c in (("user index", config.user_col), ("item index",
             config.item_col), ("sequence length", config.seq_len_col), ("label", label_col))}
    user, item = to_id(raw["user"], where["user index"]), to_id(raw["item"], where["item index"])
    bad = (item == PAD) | (item >= n_items)
    if bad.any():
        raise DataError(f"{where['item index']}: {int(bad.sum())} item index(es) outside item_info's items "
                        f"1..{n_items - 1} (0 is padding), {first_bad(bad, raw['item'])}")
    missing = user >= seqs.n_rows
    if missing.any():
        raise DataError(f"{where['user index']}: {int(missing.sum())} user(s) missing from user_info (rows "
                        f"0..{seqs.n_rows - 1}), {first_bad(missing, raw['user'])}")
    seq_len = to_id(raw["seq_len"], where["sequence length"])
    stored = seqs.offsets[user + 1] - seqs.offsets[user]
    over = seq_len > stored
    if over.any():
        row = int(np.flatnonzero(over)[0])
        raise DataError(f"{where['sequence length']}: {int(over.sum())} value(s) beyond the user's sequence in "
                        f"user_info column "
                        f"'{config.sequence_col}', first at row {row} (0-based, header excluded): seq_len "
                        f"{int(seq_len[row])}, user {int(user[row])} has {int(stored[row])} item(s)")
    label = label_from_column(raw["label"], where["label"])
    return pd.DataFrame({"user": user, "item": item, "label": label, "hist_len": seqs.visible(user, seq_len)})


def sequence_histories(seqs: Sequences, users: np.ndarray) -> pa.Table:
    """histories.parquet of ``users`` (ascending user_index): each one's sequence without padding, positions as
    timestamps, labels 1."""
    lengths = seqs.offsets[users + 1] - seqs.offsets[users]  # (U,) stored items
    first = np.repeat(seqs.offsets[users] - np.cumsum(lengths) + lengths, lengths)  # (N,) start shift per item
    values = seqs.values[first + np.arange(int(lengths.sum()))]  # (N,) the users' stored items, in order
    keep = values != PAD
    kept = np.bincount(np.repeat(np.arange(len(users)), lengths)[keep], minlength=len(users))  # (U,)
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int32)
    positions = np.arange(int(kept.sum())) - np.repeat(offsets[:-1], kept)  # (N',) 0, 1, 2 ... per user

    def column(flat: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, value_type))

    return pa.Table.from_arrays(
        [pa.array(users, pa.int64()), column(values[keep], pa.int32()), column(positions, pa.int64()),
         column(np.ones(len(positions), np.int8), pa.int8())],
        schema=HISTORIES_SCHEMA,
    )


def build_imported(config: FuxiCTRImportConfig, files: dict[str, Path]) -> CanonicalDataset:
    """Read the source files and build the canonical dataset (module docstring); meta complete."""
    n_items, pairs, genre_col = read_items(files["item_info"], config)
    seqs = read_sequences(files["user_info"], config, n_items)
    label_col = config.label_col or detect_label(files["train"], config.sep)
    parts = [read_split(files[s], s, config, label_col, seqs, n_items) for s in SPLITS]
    samples = pd.concat(parts, ignore_index=True)
    user, item = samples["user"].to_numpy(np.int64), samples["item"].to_numpy(np.int64)
    label, hist_len = samples["label"].to_numpy(np.int8), samples["hist_len"].to_numpy(np.int64)
    assign = np.repeat(np.arange(len(SPLITS), dtype=np.int8), [len(p) for p in parts])
    tables, split_counts = build_samples(user, item, hist_len, label, hist_len.astype(np.int32), assign)
    histories = sequence_histories(seqs, np.union1d(user, seqs.non_empty()).astype(np.int64))
    items, cat = build_items(ItemCatalogue(np.arange(1, n_items, dtype=np.int64)), pairs)
    behaviours = np.asarray(histories["items"].combine_chunks().values, dtype=np.int64)
    counts: dict[str, Any] = {
        "events": len(user), "behaviours": len(behaviours), "users": histories.num_rows,
        "items": len(np.union1d(item, behaviours)), "genres": len(cat.genres),
        "positives": int(label.sum()), "positive_rate": float(label.mean()) if len(label) else 0.0,
        "items_without_genres": int(np.sum(np.diff(np.asarray(items["genre_ids"].combine_chunks().offsets)) == 0)),
        **split_counts,
    }  # fmt: skip
    fractions = [round(split_counts[k]["samples"] / max(len(user), 1), 6) for k in SPLITS]
    splits = {"kind": "source", "files": {s: files[s].name for s in SPLITS}}
    meta = dataset_meta(cat, ItemCatalogue(np.zeros(0, np.int64)), None, counts, splits, fractions)
    meta.update({
        "label_rule": f"label = column '{label_col}' (0/1)",
        "source": {"format": "fuxictr", "dir": str(config.source), "files": {k: str(v) for k, v in files.items()},
                   "genre_column": genre_col, "sha256": {k: sha256_file(v) for k, v in files.items()}},
        "time": {"column": None, "input": "synthesised", "unit": "s", "rule": TIME_RULE},
        "history": {"kind": "sequence", "column": config.sequence_col, "labels": 1},
    })  # fmt: skip
    return CanonicalDataset(meta=meta, items=items, histories=histories, samples=tables, catalogue=cat)


def import_fuxictr(config: FuxiCTRImportConfig) -> dict[str, Any]:
    """Check ``config.out``, read and build, validate, write atomically (pipeline/data/prepare.py's
    ``write_dataset``: the --out / --overwrite rules of `ckv data prepare`); return meta."""
    files = source_files(Path(config.source))
    inputs = (config.source, *files.values())
    check_output_dir(Path(config.out), DATASET_OUTPUT, overwrite=config.overwrite, inputs=inputs)
    ds = build_imported(config, files)
    validate_dataset(ds, where=f"imported from {config.source}")
    write_dataset(ds, config.out, overwrite=config.overwrite, inputs=inputs)
    return ds.meta
