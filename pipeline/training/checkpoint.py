"""Checkpoint directories, the writing side: :func:`save_checkpoint` (the layout, the model version and
the reader are :mod:`cachestore.checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from collectivekv.cachestore.checkpoint import (
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    model_version,
)
from collectivekv.cachestore.store.catalogue import CATALOGUE_FILE, ItemCatalogue
from collectivekv.model.config import config_to_dict
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.pipeline.store.safe_output import OutputKind, replace_dir

CHECKPOINT_OUTPUT = OutputKind("checkpoint", "ckv train",
                               frozenset({WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CATALOGUE_FILE}),
                               signature=(CONFIG_FILE, WEIGHTS_FILE))


def save_checkpoint(path: str | Path, model: TargetAttentionCTR, metrics: dict[str, Any],
                    catalogue: ItemCatalogue | None = None, *, overwrite: bool = False,
                    inputs: tuple[str | Path | None, ...] = ()) -> str:
    """Write a checkpoint directory atomically (pipeline/store/safe_output.py); returns the model version.

    ``catalogue``: the item catalogue of the dataset the model was trained on (its size must be
    the model's n_items); None writes none (identity). A non-empty `path` that is not a checkpoint,
    or that is / contains one of `inputs`, is refused (OutputError); an existing checkpoint is
    replaced only with `overwrite`, and only on success.
    """
    if catalogue is not None and catalogue.n_items != model.cfg.n_items:
        raise CheckpointError(f"{path}: catalogue of {catalogue.n_items} items for a model of {model.cfg.n_items}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cat_sha = None if catalogue is None else catalogue.sha256
    version = model_version(model.cfg, state, cat_sha)
    with replace_dir(path, CHECKPOINT_OUTPUT, overwrite=overwrite, inputs=inputs) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        config = {"format": CHECKPOINT_FORMAT, "model": config_to_dict(model.cfg), "model_version": version}
        if catalogue is not None:
            catalogue.save(tmp / CATALOGUE_FILE)
            config["item_catalogue"] = cat_sha
            config["user_key"], config["item_key"] = catalogue.user_key, catalogue.item_key  # (in the hash too)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / METRICS_FILE).write_text(json.dumps(nan_as_null({**metrics, "model_version": version}), indent=2)
                                        + "\n")
    return version


def nan_as_null(value: Any) -> Any:
    """``value`` with every float NaN (an undefined metric, e.g. GAUC of an empty test split) as None: JSON has
    no NaN, and strict readers refuse Python's."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nan_as_null(v) for v in value]
    return value
