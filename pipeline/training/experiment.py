"""Multi-seed comparisons of KV variants on one dataset, and the results table (Markdown + JSON).

Each run trains one (variant, seed), saves its checkpoint under ``OUT/checkpoints/<variant>-seed<k>``
and contributes test GAUC / AUC / Logloss (its per-user test GAUC parts go to ``OUT/users/<variant>-seed<k>.json``);
``results.json`` records the model config each run trained (``runs[i].model``, ``variants``: the dataset's item and
genre counts filled in, as in the checkpoints); the table reports mean ± std over seeds and each variant's
compression rate CR (:func:`model.cache.compression_rate`, fp16 user parts, fp32 full K/V as the denominator), then
each variant's paired difference from ``full`` (same seed, bootstrap interval over users), the training
diagnostics of the collective variants and the per-epoch curves (:mod:`pipeline.training.quality_report`).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collectivekv.model.cache_spec import bytes_per_behaviour, compression_rate, entry_bytes, full_kv_bytes
from collectivekv.model.config import ModelConfig, config_to_dict, with_sharing
from collectivekv.model.metrics import METRICS
from collectivekv.pipeline.data.dataset_schema import CanonicalDataset
from collectivekv.pipeline.store.safe_output import OutputKind, replace_dir
from collectivekv.pipeline.training.checkpoint import CHECKPOINT_OUTPUT, save_checkpoint
from collectivekv.pipeline.training.paired import UserAUC
from collectivekv.pipeline.training.quality_report import (
    curve,
    curves_md,
    diagnostics_md,
    diagnostics_stats,
    paired_md,
    paired_vs,
)
from collectivekv.pipeline.training.trainer import TrainConfig, build_model, train_model

EXPERIMENT_OUTPUT = OutputKind("experiment", "ckv experiment",
                               frozenset({"checkpoints", "users", "results.json", "results.md"}),
                               signature=("results.json", "checkpoints"),
                               nested=(*(f"checkpoints/*/{name}" for name in sorted(CHECKPOINT_OUTPUT.entries)),
                                       "users/*.json"))


@dataclass(frozen=True)
class Variant:
    name: str
    model: ModelConfig


def standard_variants(base: ModelConfig, names: Sequence[str]) -> list[Variant]:
    """Named variants of ``base``: full, collective, share_k, share_v."""
    table = {
        "full": replace(base, kv_mode="full"),
        "collective": replace(base, kv_mode="collective"),
        "share_k": with_sharing(base, True, False),
        "share_v": with_sharing(base, False, True),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(table)}")
    return [Variant(n, table[n]) for n in names]


def run_experiment(
    dataset: CanonicalDataset,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    train: TrainConfig,
    out: Path,
    *,
    overwrite: bool = False,
    inputs: tuple[str | Path | None, ...] = (),
) -> dict[str, Any]:
    """Train every (variant, seed); write checkpoints, ``results.json`` and ``results.md`` to ``out``.

    ``out`` is written atomically when every run is done (pipeline/store/safe_output.py): a non-empty
    ``out`` that is not an experiment, or is / contains one of ``inputs``, is refused before training;
    an existing experiment is replaced only with ``overwrite``.
    """
    with replace_dir(out, EXPERIMENT_OUTPUT, overwrite=overwrite, inputs=inputs) as tmp:
        return _run_all(dataset, variants, seeds, train, tmp)


def _run_all(dataset: CanonicalDataset, variants: Sequence[Variant], seeds: Sequence[int], train: TrainConfig,
             out: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    users: dict[str, UserAUC] = {}
    used: dict[str, ModelConfig] = {}  # each variant's config as trained: the dataset's item / genre counts filled in
    for v in variants:
        for seed in seeds:
            print(f"== {v.name} seed {seed}", flush=True)
            model = build_model(dataset, v.model, seed)
            used.setdefault(v.name, model.cfg)
            result = train_model(model, dataset, replace(train, seed=seed))
            version = save_checkpoint(
                out / "checkpoints" / f"{v.name}-seed{seed}", result.model, result.metrics(), dataset.catalogue
            )
            rid = f"{v.name}-seed{seed}"
            if result.test_users is not None:
                (out / "users").mkdir(exist_ok=True)
                result.test_users.save(out / "users" / f"{rid}.json")
                users[rid] = result.test_users
            runs.append({"id": rid, "variant": v.name, "seed": seed, "model_version": version,
                         "model": config_to_dict(result.model.cfg), **result.metrics()})
            print(f"   test {result.test}  ({result.seconds:.0f} s)", flush=True)
    configs = {v.name: used.get(v.name, v.model) for v in variants}
    summary = summarise(runs, configs)
    full_runs = [r for r in runs if r["variant"] == "full"]
    for name, entry in summary.items():
        recs = [r for r in runs if r["variant"] == name]
        entry["paired_vs_full"] = paired_vs(recs, full_runs, users) if name != "full" and full_runs else None
        entry["diagnostics"] = diagnostics_stats(recs)
        entry["curve"] = curve(recs)
        entry["best_epoch"] = [r["best_epoch"] for r in recs]
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": dataset.meta.get("source", {}),
        "train": {k: getattr(train, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "patience", "device")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if train.device.startswith("cuda") else "cpu"},
        "variants": {name: config_to_dict(cfg) for name, cfg in configs.items()},
        "split": dataset.meta.get("splits"),
        "summary": summary,
        "runs": runs,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(report))
    return report


def summarise(runs: list[dict[str, Any]], configs: dict[str, ModelConfig]) -> dict[str, dict[str, Any]]:
    """Per variant: mean and std (ddof=1 when > 1 seed) of each test metric, CR and bytes."""
    out: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        rows = [r for r in runs if r["variant"] == name]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
        for m in METRICS:
            vals = np.array([r["test"][m] for r in rows], dtype=float)
            entry[m] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        entry["cache_bytes_per_behaviour"] = bytes_per_behaviour(cfg)  # full model: fp32 K/V
        entry["full_fp32_bytes_per_behaviour"] = bytes_per_behaviour(replace(cfg, kv_mode="full"))
        entry["cache_bytes_per_user_full_window"] = entry_bytes(cfg)
        entry["full_fp32_bytes_per_user_full_window"] = full_kv_bytes(cfg)
        entry["cr"] = compression_rate(cfg) if cfg.kv_mode == "collective" else 1.0
        out[name] = entry
    return out


def results_markdown(report: dict[str, Any]) -> str:
    """The results table as Markdown (test split, mean ± std over seeds)."""
    lines = [
        "| variant | seeds | GAUC | AUC | Logloss | bytes / behaviour | CR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        cells = [f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f}" for m in METRICS]
        lines.append(f"| {name} | {len(s['seeds'])} | {' | '.join(cells)} | "
                     f"{s['cache_bytes_per_behaviour']} | {100 * s['cr']:.2f}% |")  # fmt: skip
    t = report["train"]
    lines += [
        "",
        f"Test split; early stopping on validation GAUC (patience {t['patience']}, at most {t['epochs']} epochs, "
        f"batch {t['batch_size']}, lr {t['lr']}); device: {report['machine']['device']}. "
        "CR = cached bytes per user ÷ the user's full K and V in fp32 (collective: fp16 user parts + uint16 indices; "
        "the full row is the fp32 baseline itself).",
        "",
    ]
    summ = report["summary"]
    lines += paired_md([(name, s.get("paired_vs_full")) for name, s in summ.items()])
    lines += diagnostics_md([(name, s.get("diagnostics"), s.get("best_epoch", [])) for name, s in summ.items()])
    lines += curves_md([(name, s.get("curve", [])) for name, s in summ.items()])
    return "\n".join(lines)
