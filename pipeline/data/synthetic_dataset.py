"""`ckv data synth`: the synthetic scale-regime click log (pipeline/data/synthetic_ctr.py) written as a
canonical dataset (pipeline/data/dataset_schema.py) through the builder and writer of `ckv data prepare`.

The events are generated in chunks of users (tqdm progress), handed to :func:`pipeline.data.build.build_dataset`
in memory as an event log (user, item, timestamp, label) with the (item, genre) pairs of the clusters
(genre ``cNN`` = cluster NN; genre id NN + 1), split by global time (valid 10%, test 10%), validated and
written atomically by :func:`pipeline.data.prepare.write_dataset`. ``meta.json`` gets
``"source": {"synthetic": {...}}``: the generator, every parameter, the Bayes-optimal metrics on the valid
and test splits (the planted probabilities as scores) and measured structure figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from collectivekv.model.metrics import ctr_metrics
from collectivekv.pipeline.data.build import build_dataset
from collectivekv.pipeline.data.dataset_schema import validate_dataset
from collectivekv.pipeline.data.prepare import DATASET_OUTPUT, write_dataset
from collectivekv.pipeline.data.synthetic_ctr import (
    CHUNK_USERS,
    Events,
    SynthConfig,
    World,
    build_world,
    generate,
    planted_probability,
    window_share,
)
from collectivekv.pipeline.store.safe_output import check_output_dir

GENERATOR = "pipeline/data/synthetic_ctr.py"
LABEL_RULE = "synthetic: label ~ Bernoulli(sigmoid(planted score + noise)) (docs/data_schema.md)"


def genre_name(cluster: int) -> str:
    """The genre name of a cluster (sorted names give genre id = cluster + 1)."""
    return f"c{cluster:02d}"


def all_events(cfg: SynthConfig, world: World, progress: bool = True) -> Events:
    """Every chunk's events, concatenated in user id order (progress bar over users)."""
    parts: list[Events] = []
    with tqdm(total=cfg.users, unit="user", desc="synth", disable=not progress) as bar:
        for users, events in generate(cfg, world):
            parts.append(events)
            bar.update(len(users.ids))
    return Events(*(np.concatenate([getattr(p, f) for p in parts]) for f in Events.__dataclass_fields__))


def structure_stats(cfg: SynthConfig, world: World, ev: Events) -> dict[str, float]:
    """Planted structure as measured on the events: consecutive events (same user) in one cluster vs the base
    rate of two independent events sharing one (sum of squared cluster shares), the share of consecutive
    events whose second item is in the first one's neighbourhood, and the click rate when the target's
    cluster holds more / less than half of the last ``window`` events."""
    cluster = world.item_cluster[ev.item]
    pairs = ev.pos[1:] > 0  # (n - 1,) event i + 1 follows event i of the same user
    prev, nxt = ev.item[:-1][pairs], ev.item[1:][pairs]
    shares = np.bincount(cluster, minlength=cfg.clusters) / len(cluster)
    is_nb = (world.neighbours[prev] == nxt[:, None]).any(axis=1)
    local = ev.user - ev.user.min()
    share = window_share(local, cluster, ev.pos, cfg.window, cfg.clusters, cfg.max_len)
    favoured = (share > 0.5) & (ev.pos > 0)
    other = (share <= 0.5) & (ev.pos > 0)
    return {
        "consecutive_same_cluster": round(float((cluster[:-1][pairs] == cluster[1:][pairs]).mean()), 4),
        "base_same_cluster": round(float((shares**2).sum()), 4),
        "consecutive_in_neighbourhood": round(float(is_nb.mean()), 4),
        "click_rate_history_favours_target": round(float(ev.label[favoured].mean()), 4),
        "click_rate_otherwise": round(float(ev.label[other].mean()), 4),
    }


def bayes_metrics(cfg: SynthConfig, ev: Events, start: int, end: int | None = None) -> dict[str, float]:
    """GAUC / AUC / Logloss of the planted probabilities on the events with start <= timestamp < end."""
    sel = (ev.timestamp >= start) & (ev.timestamp < (np.iinfo(np.int64).max if end is None else end))
    probs = planted_probability(ev.score[sel], cfg.noise_sd)
    return {k: round(v, 6) for k, v in ctr_metrics(ev.user[sel], ev.label[sel], probs).items()}


def synthetic_source(cfg: SynthConfig, world: World, ev: Events, splits: dict[str, Any]) -> dict[str, Any]:
    """meta.json's ``"source"`` of a synthetic dataset."""
    return {"synthetic": {
        "generator": GENERATOR, "params": cfg.params(), "chunk_users": CHUNK_USERS,
        "genres": "genre cNN = cluster NN (primary), plus a secondary cluster for some items",
        "bayes": {"score": "E_n[sigmoid(x + n)] of the planted score x (the ceiling of any model)",
                  "valid": bayes_metrics(cfg, ev, splits["valid_start"], splits["test_start"]),
                  "test": bayes_metrics(cfg, ev, splits["test_start"])},
        "structure": structure_stats(cfg, world, ev),
    }}


def synth_dataset(cfg: SynthConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True
                  ) -> dict[str, Any]:
    """Generate the dataset of ``cfg`` and write it to ``out`` (a new / empty directory, or a dataset with
    ``overwrite``; checked before any work); return its meta."""
    out = Path(out)
    check_output_dir(out, DATASET_OUTPUT, overwrite=overwrite, inputs=())
    world = build_world(cfg)
    ev = all_events(cfg, world, progress)
    items, genres = world.genre_pairs()
    pairs = pd.DataFrame({"item": items, "genre": np.array([genre_name(c) for c in range(cfg.clusters)])[genres]})
    frame = pd.DataFrame({"user": ev.user, "item": ev.item, "timestamp": ev.timestamp, "label": ev.label},
                         copy=False)
    ds = build_dataset(frame, pairs, valid_frac=0.1, test_frac=0.1)
    del frame
    ds.meta["label_rule"] = LABEL_RULE
    ds.meta["time"] = {"column": "timestamp", "input": "number", "unit": "s"}
    ds.meta["source"] = synthetic_source(cfg, world, ev, ds.meta["splits"])
    validate_dataset(ds, where=f"synthetic dataset for {out}")
    write_dataset(ds, out, overwrite=overwrite)
    return ds.meta
