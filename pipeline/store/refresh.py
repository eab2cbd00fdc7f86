"""The nightly refresh cycle (`ckv refresh`), one job a scheduler calls (docs/nightly.md):

1. prepare the new day's dataset (``pipeline.data.prepare.prepare``: ``ckv data prepare``), extending
   the current model's item catalogue: known items keep their dense ids, new ones are appended;
2. train a new model warm-started from the current one (``ckv train --init-from``: same model
   options; item and genre embedding rows matched by raw id, ``pipeline.training.warm_start``);
3. evaluate new and current model (its rows remapped to the new catalogue) on the NEW validation
   split; refuse (``RefreshRefused``, exit 3,
   nothing published) when the new one's metric is worse than the current one's by more than
   ``margin``;
4. prefill every user with the new model (``pipeline.prefill.spark_job.run_prefill``, ``--incremental``
   against the store: a new model version makes it a full prefill, an unchanged one an incremental)
   into a scratch store ``STORE/staging/refresh-<id>/`` (same filesystem); Spark's log and, on
   failure, the full trace go to ``WORK/<run id>/prefill.log``, the failure to one line
   (pipeline/prefill/spark_logging.py);
5. verify the scratch store against the new model and the new histories (``pipeline.store.verify``);
6. publish checkpoint and store together: the verified version directory is moved to
   ``STORE/staging/<id>``, the checkpoint copied into it as ``checkpoint/`` (recorded in the
   manifest), and ``cachestore.store.publish.publish`` switches ``current`` with one rename. Serving opens
   the model from the same version it reads records from (``DecodeRuntime.open(STORE)`` without a
   checkpoint), so a store is never paired with another model version.

The current model is ``STORE/current/checkpoint`` (or ``current_checkpoint`` for the first run of a
store). Any failure before the switch leaves ``current`` untouched and removes the scratch files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from collectivekv.cachestore.store.publish import (
    MANIFEST,
    STAGING,
    CurrentMoved,
    current_version_id,
    new_version_id,
    open_current,
)
from collectivekv.pipeline.store.store_ops import store_checkpoint

log = logging.getLogger("ckv.refresh")


class RefreshError(RuntimeError):
    """The refresh could not run (inputs, shapes, verification); nothing was published."""


class RefreshRefused(RefreshError):
    """The new model is worse than the current one by more than the margin; nothing was published."""


@dataclass(frozen=True)
class RefreshOptions:
    store: str
    work: str  # dataset + checkpoint of this run are written under WORK/<run id>/
    prepare: Any  # pipeline.data.prepare.PrepareConfig without out (set by the refresh), or None: dataset given
    dataset: str | None = None  # an already prepared dataset dir (instead of prepare)
    current_checkpoint: str | None = None  # default STORE/current/checkpoint
    train: Any = None  # pipeline.training.trainer.TrainConfig
    metric: str = "gauc"
    margin: float = 0.005  # refuse if new < current - margin (absolute, on `metric`)
    prefill: dict[str, Any] = field(default_factory=dict)  # extra PrefillOptions fields (master, engine, ...)
    verify_sample: int | None = None  # users verified (None: all)
    spark: Any = None  # an existing SparkSession (tests)


def publish_with_checkpoint(store: str | os.PathLike, scratch: Path, checkpoint: str | os.PathLike,
                            extra: dict[str, Any], expect_current: str | None) -> dict[str, Any]:
    """Move the scratch store's current version to STORE/staging/<id>, add the checkpoint, publish — only if
    STORE/current is still ``expect_current`` (the version whose model the gate compared against)."""
    from collectivekv.pipeline.store.store_ops import attach_checkpoint, publish_staged

    def complete(staging: Path) -> dict[str, Any]:
        with open(staging / MANIFEST, encoding="utf-8") as fh:
            manifest = json.load(fh)
        try:
            attach_checkpoint(staging, checkpoint, manifest)
        except ValueError as exc:
            raise RefreshError(str(exc)) from None
        manifest["refresh"] = extra
        return manifest

    root = Path(store)
    src = Path(os.path.realpath(open_current(scratch)))
    staging = root / STAGING / src.name
    os.rename(src, staging)
    try:
        manifest, result = publish_staged(root, staging, complete, expect_current=expect_current)
    except CurrentMoved as exc:
        raise RefreshRefused(f"{exc}: the gate compared the new model with the one {expect_current} serves") from None
    manifest["version_id"] = result.version_id
    return manifest


def run_refresh(opts: RefreshOptions) -> dict[str, Any]:
    """The whole cycle; returns a report (also written to WORK/<run id>/refresh.json)."""
    t0 = time.perf_counter()
    run = _Run(new_version_id(), opts)
    run.work.mkdir(parents=True)
    cur_dir, current, data_dir, dataset = _prepare_step(run)
    new_ckpt, new_version, result, current_remapped = _train_step(run, cur_dir, current, dataset)
    gate = _gate_step(run, current, current_remapped, result.model, dataset, new_version)
    manifest = _publish_step(run, new_ckpt, data_dir, gate, new_version)
    run.report["published"] = {"version_id": manifest["version_id"], "model_version": new_version,
                               "users": manifest["users"]}
    run.report["seconds"] = round(time.perf_counter() - t0, 2)
    _write_report(run.work, run.report)
    return run.report


class _Run:
    """One refresh: its id, options, work directory WORK/<run id> and the report its steps fill."""

    def __init__(self, run_id: str, opts: RefreshOptions) -> None:
        self.run_id, self.opts = run_id, opts
        self.work = Path(opts.work) / run_id
        self.report: dict[str, Any] = {"run_id": run_id, "store": str(opts.store), "steps": {}}
        self.baseline = current_version_id(opts.store)  # the version the gate compares against, publish expects

    def step(self, name: str, t: float, **info: Any) -> None:
        self.report["steps"][name] = {"seconds": round(time.perf_counter() - t, 2), **info}
        log.info("refresh %s: %s", name, self.report["steps"][name])


def _prepare_step(run: _Run) -> tuple[Path, Any, Path, Any]:
    """1. prepare, extending the current model's item catalogue (known items keep their dense ids):
    (current checkpoint dir, current checkpoint, dataset dir, dataset)."""
    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.pipeline.data.dataset_schema import load_dataset
    from collectivekv.pipeline.data.prepare import prepare

    opts, t = run.opts, time.perf_counter()
    cur_dir = Path(opts.current_checkpoint) if opts.current_checkpoint else store_checkpoint(opts.store)
    if cur_dir is None:
        raise RefreshError(f"{opts.store} has no published checkpoint: give the current model "
                           "(--current-checkpoint) for the first refresh of a store")
    current = load_checkpoint(cur_dir)
    if opts.dataset:
        data_dir = Path(opts.dataset)
    else:
        data_dir = run.work / "data"
        prep = replace(opts.prepare, out=data_dir)
        if prep.catalogue is None and not prep.new_catalogue and current.catalogue is not None:
            prep = replace(prep, catalogue=cur_dir)
        prepare(prep)
    dataset = load_dataset(data_dir)
    run.step("prepare", t, dataset=str(data_dir), users=dataset.n_users, items=dataset.n_items)
    return cur_dir, current, data_dir, dataset


def _train_step(run: _Run, cur_dir: Path, current: Any, dataset: Any) -> tuple[Path, str, Any, Any]:
    """2. train --init-from the current model (item / genre rows matched by raw id): (new checkpoint dir, its
    model version, the training result, the current model with its rows remapped to the new catalogue)."""
    from collectivekv.pipeline.training.checkpoint import save_checkpoint
    from collectivekv.pipeline.training.trainer import TrainConfig, build_model, train_model
    from collectivekv.pipeline.training.warm_start import WarmStartError, remapped_model, warm_start

    opts, t = run.opts, time.perf_counter()
    seed = (opts.train or TrainConfig()).seed
    try:
        model = build_model(dataset, current.config, seed)
        warm = warm_start(model, current, dataset.catalogue)
        current_remapped = remapped_model(build_model(dataset, current.config, seed), current, dataset.catalogue)
    except WarmStartError as exc:
        raise RefreshError(f"warm start impossible: {exc}") from exc
    result = train_model(model, dataset, opts.train or TrainConfig(progress=False))
    new_ckpt = run.work / "checkpoint"
    new_version = save_checkpoint(new_ckpt, result.model, {**result.metrics(), "init_from": str(cur_dir),
                                                           "warm_start": warm.as_dict()}, dataset.catalogue)
    run.step("train", t, checkpoint=str(new_ckpt), model_version=new_version, init_from=current.model_version,
             warm_start=warm.as_dict())
    return new_ckpt, new_version, result, current_remapped


def _gate_step(run: _Run, current: Any, current_remapped: Any, new_model: Any, dataset: Any, new_version: str
               ) -> dict[str, Any]:
    """3. evaluate against the current model (its rows remapped to the new catalogue) on the new valid split;
    RefreshRefused (report written) when the new model is worse by more than the margin."""
    import torch

    from collectivekv.model.events import EventSpec
    from collectivekv.pipeline.data.history import HistoryIndex
    from collectivekv.pipeline.training.trainer import TrainConfig, evaluate

    opts, t = run.opts, time.perf_counter()
    valid = dataset.samples["valid"]
    bs = (opts.train or TrainConfig()).eval_batch_size
    with torch.no_grad():  # each model reads the histories with its own per-event features
        cur_m = evaluate(current_remapped.eval(), HistoryIndex(dataset.histories, EventSpec.of(current_remapped.cfg)),
                         valid, bs)
        new_m = evaluate(new_model.eval(), HistoryIndex(dataset.histories, EventSpec.of(new_model.cfg)), valid, bs)
    delta = new_m[opts.metric] - cur_m[opts.metric]
    gate = {"metric": opts.metric, "current": cur_m, "new": new_m, "delta": delta, "margin": opts.margin,
            "current_model": current.model_version, "passed": delta >= -opts.margin}
    run.report["gate"] = gate
    run.step("evaluate", t, delta=round(delta, 6), passed=gate["passed"])
    if not gate["passed"]:
        _write_report(run.work, run.report)
        raise RefreshRefused(f"new model {new_version} is worse than the current {current.model_version} on valid "
                             f"{opts.metric}: {new_m[opts.metric]:.5f} vs {cur_m[opts.metric]:.5f} "
                             f"(delta {delta:+.5f} < -margin {opts.margin}); nothing published")
    return gate


def _publish_step(run: _Run, new_ckpt: Path, data_dir: Path, gate: dict[str, Any], new_version: str
                  ) -> dict[str, Any]:
    """4. prefill into a scratch store; 5. verify it; 6. publish checkpoint + store together: the manifest."""
    from collectivekv.pipeline.store.verify import verify_store

    opts, run_id = run.opts, run.run_id
    scratch = Path(opts.store) / STAGING / f"refresh-{run_id}"
    try:
        _prefill_step(run, new_ckpt, data_dir, scratch)
        t = time.perf_counter()
        res = verify_store(scratch, new_ckpt, data_dir, sample=opts.verify_sample)
        run.step("verify", t, ok=res.ok, users_checked=res.users_checked, max_abs_err=res.max_abs_err)
        if not res.ok:
            raise RefreshError(f"verification of the new store failed ({res.mismatch_count} mismatches): "
                               f"{res.mismatches[:5]}")
        t = time.perf_counter()
        manifest = publish_with_checkpoint(opts.store, scratch, new_ckpt, {"run_id": run_id, "gate": gate},
                                           run.baseline)
        run.step("publish", t, version_id=manifest["version_id"], model_version=new_version)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _prefill_step(run: _Run, new_ckpt: Path, data_dir: Path, scratch: Path) -> None:
    """4. the incremental prefill of the new model into ``scratch`` (Spark's log: WORK/<run id>/prefill.log)."""
    from collectivekv.cachestore.checkpoint import CheckpointError
    from collectivekv.pipeline.prefill.prefill import PrefillInputError
    from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
    from collectivekv.pipeline.prefill.spark_logging import SparkJobError, spark_job_errors

    opts, run_id, t = run.opts, run.run_id, time.perf_counter()
    log_file = run.work / "prefill.log"  # Spark's log and, on failure, the full trace
    popts = PrefillOptions(checkpoint=str(new_ckpt), histories=str(data_dir), store=str(scratch),
                           incremental=True, previous=str(opts.store), log_file=str(log_file),
                           command_line=f"ckv refresh {run_id}", **opts.prefill)
    try:
        with spark_job_errors(f"refresh {run_id}: prefill", log_file, passthrough=(RefreshError,)):
            pman = run_prefill(popts, spark=opts.spark)
    except (SparkJobError, PrefillInputError, CheckpointError, ValueError) as exc:
        raise RefreshError(str(exc)) from exc
    run.step("prefill", t, users=pman["users"], incremental=pman["prefill"].get("incremental"))


def _write_report(work: Path, report: dict[str, Any]) -> None:
    from collectivekv.pipeline.store.store_ops import write_json

    write_json(work / "refresh.json", report)
