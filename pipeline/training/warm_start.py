"""Warm start by raw id: load an earlier model's weights into a model built for a new dataset.

Dense item ids change meaning only through the item catalogue (``cachestore/store/catalogue.py``): an item
keeps its id while the catalogue is extended, but a dataset prepared with another catalogue (or
afresh) numbers its items differently. So the vocabulary tables are copied row by row by raw id:

    *item_emb.weight   (n_items + 1, E)   row d = dense item d; matched by raw item id
    *genre_emb.weight  (n_genres + 1, E)  row g = genre g; matched by genre name
    *item_genres       (n_items + 1, G)   rebuilt from the new dataset, never copied
    item_block_start, row_categories      SIM keyed by its router index: functions of item_genres, rebuilt too
                                          (a dataset with another number of genre sets has pools of another
                                          number of rows: the shape check below refuses it)

Rows of items (genres) the old model did not know keep the new model's fresh initialisation; row 0
(padding) is copied. Every other tensor must have the same shape in both models and is copied as is.
A checkpoint without a catalogue (trained before catalogues existed) is copied by dense id, which
needs the same shapes (the old behaviour; reported as ``positional``).

``ckv train --init-from`` and ``ckv refresh`` use :func:`warm_start`; the refresh's quality gate
evaluates the current model remapped the same way (:func:`remapped_model`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from collectivekv.cachestore.checkpoint import Checkpoint
from collectivekv.cachestore.store.catalogue import ItemCatalogue
from collectivekv.model.config import config_to_dict

ITEM_TABLE, GENRE_TABLE = "item_emb.weight", "genre_emb.weight"
REBUILT = ("item_genres", "item_block_start", "row_categories")  # functions of the new dataset's item genres
VOCAB_FIELDS = ("n_items", "n_genres", "max_genres", "dropout")  # may differ between the two models


class WarmStartError(ValueError):
    """The earlier model cannot be loaded into the new one; the message says why and what to do."""


@dataclass(frozen=True)
class WarmStartReport:
    """How the vocabulary rows were matched (counts of items / genres)."""

    mode: str  # "raw_id" or "positional" (earlier checkpoint without a catalogue)
    items_kept: int
    items_new: int
    items_dropped: int
    genres_kept: int
    genres_new: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def matching_rows(old_keys: np.ndarray, new_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(old rows, new rows), 1-based: the rows whose key (raw id / genre name) is in both tables."""
    _, old_pos, new_pos = np.intersect1d(old_keys, new_keys, assume_unique=True, return_indices=True)
    return old_pos.astype(np.int64) + 1, new_pos.astype(np.int64) + 1


def _check_shape(prev: Checkpoint, cfg: Any) -> None:
    fixed = {f: getattr(cfg, f) for f in VOCAB_FIELDS}
    if config_to_dict(replace(prev.config, **fixed)) != config_to_dict(cfg):  # options that change nothing: equal
        raise WarmStartError(f"{prev.path}: its model config differs from this run's beyond the item/genre "
                             f"vocabulary; warm start needs the same model shape (checkpoint: {prev.config}, "
                             f"run: {cfg}): train from scratch or use the same model options")


def warm_start(model: torch.nn.Module, prev: Checkpoint, catalogue: ItemCatalogue | None) -> WarmStartReport:
    """Copy ``prev``'s weights into ``model`` (built for a dataset with ``catalogue``; None = identity)."""
    _check_shape(prev, model.cfg)
    positional = prev.catalogue is None or catalogue is None
    new_cat = catalogue or ItemCatalogue.identity(model.cfg.n_items)
    old_cat = prev.item_catalogue
    if positional and (prev.config.n_items, prev.config.n_genres) != (model.cfg.n_items, model.cfg.n_genres):
        raise WarmStartError(f"{prev.path} has no item catalogue (trained before catalogues), so its rows can only be "
                             f"copied by dense id, which needs the same vocabulary: n_items {prev.config.n_items} -> "
                             f"{model.cfg.n_items}, n_genres {prev.config.n_genres} -> {model.cfg.n_genres}; "
                             "train from scratch")
    if positional:
        item_rows = (np.arange(1, model.cfg.n_items + 1),) * 2
        genre_rows = (np.arange(1, model.cfg.n_genres + 1),) * 2
    else:
        item_rows = matching_rows(old_cat.raw_items, new_cat.raw_items)
        genre_rows = matching_rows(np.array(old_cat.genres, dtype=str), np.array(new_cat.genres, dtype=str))
    old_state, new_state = prev.model.state_dict(), model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for name, new in new_state.items():
        old = old_state.get(name)
        if name.endswith(REBUILT):
            merged[name] = new
        elif name.endswith((ITEM_TABLE, GENRE_TABLE)):
            old_rows, new_rows = item_rows if name.endswith(ITEM_TABLE) else genre_rows
            table = new.clone()
            table[0] = old[0]
            table[torch.from_numpy(new_rows)] = old[torch.from_numpy(old_rows)].to(table.dtype)
            merged[name] = table
        elif old is None or old.shape != new.shape:
            raise WarmStartError(f"{prev.path}: tensor {name} has shape "
                                 f"{None if old is None else tuple(old.shape)}, this run's model {tuple(new.shape)}")
        else:
            merged[name] = old
    model.load_state_dict(merged, strict=True)
    kept = len(item_rows[0])
    return WarmStartReport(mode="positional" if positional else "raw_id", items_kept=kept,
                           items_new=model.cfg.n_items - kept, items_dropped=prev.config.n_items - kept,
                           genres_kept=len(genre_rows[0]), genres_new=model.cfg.n_genres - len(genre_rows[0]))


def remapped_model(fresh: torch.nn.Module, prev: Checkpoint, catalogue: ItemCatalogue | None) -> torch.nn.Module:
    """A copy of ``fresh`` (built for the new dataset) holding ``prev``'s weights by raw id: the current
    model as it scores the new dataset's items (new items: fresh rows)."""
    model = copy.deepcopy(fresh)
    warm_start(model, prev, catalogue)
    return model
