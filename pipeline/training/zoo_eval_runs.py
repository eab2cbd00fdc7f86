"""`ckv eval`'s runs: one (model config, seed, training config) trained and evaluated per :class:`Job`,
in parallel spawned processes, each written to its own JSON record (resumable), plus the
``--d-user auto`` choice from a trained full model's K/V. The plan and the report are in
:mod:`pipeline.training.zoo_eval`."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collectivekv.model.cache_spec import compression_rate
from collectivekv.model.config import ModelConfig, config_to_dict
from collectivekv.model.d_user import choose_d_user
from collectivekv.model.events import EventSpec
from collectivekv.pipeline.data.dataset_schema import CanonicalDataset, load_dataset, read_meta
from collectivekv.pipeline.data.history import HistoryIndex
from collectivekv.pipeline.training.trainer import TrainConfig, build_model, train_model


def run_id(cfg: ModelConfig, seed: int, train: TrainConfig, sample_fraction: float = 1.0) -> str:
    key = {
        "model": config_to_dict(cfg),
        "seed": seed,
        **({"sample_fraction": sample_fraction} if sample_fraction < 1 else {}),
        "train": {k: getattr(train, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "patience")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(data_dir: str | Path) -> str:
    """A dataset's identity in run records (not its path): the source events' sha256, the split, the label rule,
    the counts, the key schemes and the catalogue's sha256, from its meta.json."""
    meta = read_meta(data_dir)
    key = {k: meta.get(k) for k in ("schema_version", "splits", "split_fractions", "label_rule", "counts",
                                    "n_items", "user_key", "item_key")}
    key.update(source=(meta.get("source") or {}).get("sha256"), catalogue=(meta.get("catalogue") or {}).get("sha256"))
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunMismatch(ValueError):
    """A finished run record in --out was trained on another dataset than --data."""


def users_file(record_file: str | Path) -> Path:
    """Where a run's per-user test GAUC parts are kept: ``runs/users/<id>.json`` for the record ``runs/<id>.json``
    (a folder of their own, so that ``runs/*.json`` stays the run records)."""
    p = Path(record_file)
    return p.parent / "users" / p.name


# ---------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Job:
    rid: str
    cfg: ModelConfig
    seed: int
    train: TrainConfig
    data_dir: str
    out_file: str
    auto: dict[str, Any] | None = None  # if set: choose d_u from this (full) model's K/V after training
    sample_fraction: float = 1.0
    threads: int | None = None  # torch CPU threads of the process running the job (parallel workers)
    data_fp: str | None = None  # data_fingerprint(data_dir): recorded, and checked before a record is reused


_DATASETS: dict[tuple[str, float], CanonicalDataset] = {}


def _dataset(path: str, fraction: float = 1.0) -> CanonicalDataset:
    """The dataset at ``path``; with ``fraction`` < 1 each split keeps a seeded random subset of its
    samples (in their original order)."""
    if (path, fraction) not in _DATASETS:
        ds = load_dataset(path)
        if fraction < 1:
            rng = np.random.default_rng(0)
            samples = {}
            for split, t in ds.samples.items():
                keep = np.sort(rng.choice(t.num_rows, max(1, int(t.num_rows * fraction)), replace=False))
                samples[split] = t.take(keep)
            ds = replace(ds, samples=samples)
        _DATASETS[(path, fraction)] = ds
    return _DATASETS[(path, fraction)]


def collect_kv_rows(
    model: torch.nn.Module, index: HistoryIndex, max_rows: int, seed: int, batch_users: int = 64
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """K and V rows of every cached group over users' latest windows: group → (K (N, d_a), V (N, d_a),
    user ids (N,)), at most ``max_rows`` rows per group (random users first)."""
    rng = np.random.default_rng(seed)
    users = rng.permutation(index.users)
    device = next(model.parameters()).device
    out: dict[str, list[list[torch.Tensor]]] = {}
    n_rows = 0
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(users), batch_users):
            ub = users[lo : lo + batch_users]
            w = index.window(ub, None, model.cfg.window_len)
            lengths = torch.from_numpy(w.lengths).to(device)
            cache = model.prefill(
                torch.from_numpy(w.items).to(device), torch.from_numpy(w.feedback).to(device), lengths
            )
            kv = model.keys_values(cache)
            groups = kv if isinstance(kv, dict) else {"kv": kv}
            for name, (k, v) in groups.items():
                if k.shape[-1] == 0:  # a V-only group: no K
                    k = v
                lens = cache.kv[name].lengths if isinstance(kv, dict) else cache.lengths
                valid = torch.arange(v.shape[1], device=device).unsqueeze(0) < lens.unsqueeze(1)
                uid = torch.from_numpy(ub).to(device).unsqueeze(1).expand_as(valid)
                out.setdefault(name, []).append([k[valid].cpu(), v[valid].cpu(), uid[valid].cpu()])
            n_rows += int(w.lengths.sum())
            if n_rows >= 4 * max_rows:
                break
    result = {}
    for name, parts in out.items():
        k, v, u = (torch.cat([p[i] for p in parts]) for i in range(3))
        if k.shape[0] > max_rows:
            sel = torch.from_numpy(rng.choice(k.shape[0], max_rows, replace=False))
            k, v, u = k[sel], v[sel], u[sel]
        result[name] = (k, v, u)
    return result


def auto_d_user(
    model: torch.nn.Module,
    dataset: CanonicalDataset,
    pool_size: int,
    eps: float,
    cr_budget: float,
    max_rows: int,
    seed: int,
) -> dict[str, Any]:
    """The ``--d-user auto`` choice from a trained *full* model: the largest per-group/K/V spectral
    choice (:func:`model.d_user.choose_d_user`), capped to the largest d_u whose CR <= cr_budget."""
    cfg: ModelConfig = model.cfg
    dev = next(model.parameters()).device
    rows = collect_kv_rows(model, HistoryIndex(dataset.histories, EventSpec.of(cfg)), max_rows, seed)
    per_group: dict[str, Any] = {}
    for name, (k, v, u) in rows.items():
        for kind, x in (("k", k), ("v", v)):
            c = choose_d_user(x.to(dev), u.to(dev), pool_size, eps=eps, seed=seed)
            per_group[f"{name}.{kind}"] = {
                "d_user": c.d_user,
                "d_spectral": c.d_spectral,
                "codes": c.codes,
                "unexplained": [round(f, 5) for f in c.unexplained[:17]],
            }
    spectral = max(g["d_user"] for g in per_group.values())
    coll = replace(cfg, kv_mode="collective", collective=replace(cfg.collective, pool_size=pool_size))
    cap = max(
        [
            d
            for d in range(1, cfg.d_attn)
            if compression_rate(replace(coll, collective=replace(coll.collective, d_user=d))) <= cr_budget
        ]
        or [1]
    )
    return {
        "d_user": min(spectral, cap),
        "spectral": spectral,
        "cr_cap": cap,
        "eps": eps,
        "cr_budget": cr_budget,
        "groups": per_group,
        "rows": {n: int(r[0].shape[0]) for n, r in rows.items()},
    }


def execute(job: Job) -> dict[str, Any]:
    """Train one run (and, if asked, choose d_u from it); write and return its record."""
    if job.threads:
        torch.set_num_threads(job.threads)
    if job.train.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds = _dataset(job.data_dir, job.sample_fraction)
    t0 = time.perf_counter()
    model = build_model(ds, job.cfg, job.seed)
    result = train_model(model, ds, replace(job.train, seed=job.seed))
    record: dict[str, Any] = {
        "id": job.rid,
        "arch": job.cfg.arch,
        "seed": job.seed,
        "config": config_to_dict(result.model.cfg),
        **result.metrics(),
        **({"data": job.data_fp} if job.data_fp else {}),
    }
    record["cr"] = compression_rate(result.model.cfg) if job.cfg.kv_mode == "collective" else 1.0
    record["n_params"] = int(sum(p.numel() for p in result.model.parameters()))
    record["device"] = device_name(job.train.device)
    if job.auto is not None:
        t1 = time.perf_counter()
        record["auto"] = auto_d_user(result.model, ds, seed=job.seed, **job.auto)
        record["auto"]["seconds"] = round(time.perf_counter() - t1, 2)
    record["wall_seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(job.out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    if result.test_users is not None:  # before the record, whose file marks the run finished
        users_file(out).parent.mkdir(exist_ok=True)
        result.test_users.save(users_file(out))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
    return record


def reusable(job: Job) -> dict[str, Any] | None:
    """The finished record of ``job`` when it serves it: None without one, or when ``job`` chooses d_u (auto) and
    the record, trained for another section, holds no choice (the run is trained again). A record of another
    dataset raises :class:`RunMismatch` (nothing is overwritten); records without a fingerprint are trusted."""
    path = Path(job.out_file)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if job.data_fp and record.get("data", job.data_fp) != job.data_fp:
        raise RunMismatch(f"{path}: a run trained on another dataset (fingerprint {record['data']}; --data's is "
                          f"{job.data_fp}): give this dataset its own --out")
    return None if job.auto is not None and "auto" not in record else record


def run_jobs(jobs: Sequence[Job], workers: int, log: Any = print) -> list[dict[str, Any]]:
    """Run jobs without a reusable record (:func:`reusable`; in ``workers`` spawned processes if > 1)."""
    records = {j.rid: reusable(j) for j in jobs}
    todo = [j for j in jobs if records[j.rid] is None]
    done = {rid: r for rid, r in records.items() if r is not None}
    if todo:
        log(f"{len(todo)} run(s) to train, {len(done)} already done")

    def note(r: dict[str, Any]) -> None:
        t, c = r["test"], r["config"]
        what = (
            "full"
            if c.get("kv_mode") == "full"
            else (
                "collective d_u={d_user} pool={pool_size} share={sk}{sv} w=({peak_weight:g},{balance_weight:g})".format(
                    sk="K" if c["collective"]["share_k"] else "",
                    sv="V" if c["collective"]["share_v"] else "",
                    **c["collective"],
                )
            )
        )
        log(
            f"  {r['arch']:5s} seed {r['seed']} {what:52s} gauc {t['gauc']:.4f} auc {t['auc']:.4f} "
            f"logloss {t['logloss']:.4f} ({r['wall_seconds']:.0f} s)"
            + (f" auto d_u {r['auto']['d_user']}" if "auto" in r else "")
        )

    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(execute, replace(j, threads=threads)) for j in todo]
            for f in as_completed(futures):
                r = f.result()
                done[r["id"]] = r
                note(r)
    else:
        for j in todo:
            r = execute(j)
            done[r["id"]] = r
            note(r)
    return [done[j.rid] for j in jobs]


# ------------------------------------------------------------------------------------- the job
def device_name(device: str) -> str:
    """"cpu" or the CUDA device's name (what a run record and the report say it ran on)."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def finished_runs(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """The reusable records of the jobs (:func:`reusable`); trains nothing."""
    return [r for r in map(reusable, jobs) if r is not None]
