"""Checkpoint directories, the reading side: the layout, the model version and :func:`load_checkpoint`.

The training job writes them (:func:`pipeline.training.checkpoint.save_checkpoint`); serving, prefill
and the reports read them through this module.

Layout of a checkpoint directory::

    weights.safetensors   every tensor of the model's state dict (no pickle anywhere)
    config.json           {"format": 1, "model": <ModelConfig as dict>, "model_version": "<16 hex>",
                           "item_catalogue": "<sha256 of catalogue.parquet's content>" (if any),
                           "user_key", "item_key": the catalogue's key schemes (if any; absent: "int";
                           cachestore/store/user_keys.py)}
    catalogue.parquet     the item catalogue the model was trained with (cachestore/store/catalogue.py):
                          raw item id <-> embedding row; absent = the identity catalogue (raw = dense)
    metrics.json          whatever the training job measured (valid/test metrics, history, timing)

The model version is a fingerprint of config + weights (+ catalogue): the first 16 hex digits of
sha256(canonical config JSON, then for each tensor in name order: name, dtype, shape, raw bytes,
then "catalogue|<sha256>" when the checkpoint has a catalogue). Caches carry it, so a store is never
decoded with a model (or an item numbering) it was not built from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from collectivekv.cachestore.store.catalogue import CATALOGUE_FILE, CatalogueError, ItemCatalogue, load_catalogue
from collectivekv.model.config import ModelConfig, config_from_dict, config_to_dict
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.zoo import create_model

CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the path."""


@dataclass(frozen=True)
class Checkpoint:
    model: TargetAttentionCTR
    config: ModelConfig
    model_version: str
    metrics: dict[str, Any]
    path: Path
    catalogue: ItemCatalogue | None = None  # None: trained without one (identity: raw id = dense id)

    @property
    def item_catalogue(self) -> ItemCatalogue:
        """The model's catalogue; the identity one for a checkpoint without one."""
        return self.catalogue or ItemCatalogue.identity(self.config.n_items)


def model_version(cfg: ModelConfig, state: dict[str, torch.Tensor], catalogue_sha256: str | None = None) -> str:
    """16-hex fingerprint of a config, a state dict and a catalogue hash (see module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps(config_to_dict(cfg), sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: its one value
    if catalogue_sha256 is not None:
        h.update(f"catalogue|{catalogue_sha256}".encode())
    return h.hexdigest()[:16]


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint (eval mode); verifies the weights match the config and the version."""
    root = Path(path)
    cfg_file, w_file = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise CheckpointError(f"{root}: not a checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: unreadable config.json: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_file}: config.json is not a JSON object")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{cfg_file}: checkpoint format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}"
        )
    try:
        cfg = config_from_dict(meta["model"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{cfg_file}: invalid model config: {exc}") from exc
    try:  # safetensors: a header + raw tensor bytes, never unpickled
        state = load_file(str(w_file))
    except Exception as exc:  # SafetensorError, OSError, ...: a damaged or foreign (e.g. pickle) file
        raise CheckpointError(f"{w_file}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                              "checkpoints are loaded from safetensors only (never pickle): re-export it") from exc
    try:
        model = create_model(cfg, state.get("item_genres"))  # any zoo arch (model/zoo.py)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{root}: weights do not match config.json: {exc}") from exc
    catalogue = _load_catalogue(root, meta.get("item_catalogue"), cfg.n_items)
    version = model_version(cfg, state, None if catalogue is None else catalogue.sha256)
    if version != meta.get("model_version"):
        raise CheckpointError(
            f"{root}: weights fingerprint {version} differs from config.json's model_version "
            f"{meta.get('model_version')!r} (files modified or mixed)"
        )
    metrics_file = root / METRICS_FILE
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{metrics_file}: unreadable metrics.json: {exc}") from exc
    return Checkpoint(model.to(device).eval(), cfg, version, metrics, root, catalogue)


def _load_catalogue(root: Path, sha256: Any, n_items: int) -> ItemCatalogue | None:
    """The checkpoint's catalogue (hash and size checked against config.json); None if it records none."""
    if sha256 is None:
        return None
    try:
        catalogue = load_catalogue(root / CATALOGUE_FILE, expected_sha256=str(sha256))
    except CatalogueError as exc:
        raise CheckpointError(f"{root}: {exc}") from None
    if catalogue.n_items != n_items:
        raise CheckpointError(f"{root}: {CATALOGUE_FILE} has {catalogue.n_items} items, the model {n_items}")
    return catalogue
