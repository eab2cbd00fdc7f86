"""`ckv eval`: the paper's evaluation on a canonical dataset — every zoo model, full vs CollectiveKV,
plus the ablations — as one resumable job.

Sections (each a set of labelled rows; a row is one model config trained with every seed):

- ``table1`` — GAUC, AUC, Logloss and CR of each model (``models``), full vs collective;
- ``table3`` — router-loss ablation on ``ablation_model``: full, no losses, peak only, balance
  only, both;
- ``table4`` — sharing ablation on ``ablation_model``: full, K only, V only, both;
- ``fig4`` / ``fig5`` — GAUC vs d_u (``d_users``) and vs pool size (``pools``) on
  ``ablation_model`` (PNG plots, with a quadratic fit as in the paper);
- ``auto`` — the ``--d-user auto`` choice (:mod:`model.d_user`, from the trained full model's K/V,
  capped so that CR <= ``cr_budget``) on ``ablation_model``, against the best fixed d_u of fig4.

Runs are identified by (model config, seed, training config): a config that appears in several
sections is trained once. Each finished run is written to ``OUT/runs/<id>.json`` right away and is
skipped when the job is run again (resume after an interruption). The report is
``OUT/results.json`` + ``OUT/results.md`` + ``OUT/fig4_d_user.png`` + ``OUT/fig5_pool.png``.
With ``workers > 1`` runs go to that many processes (spawned; they share the device).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from model.config import CollectiveConfig, ModelConfig, config_to_dict
from model.zoo import PAPER_MODELS
from pipeline.trainer import TrainConfig
from pipeline.zoo_eval_report import markdown, plot_sweep, summarise
from pipeline.zoo_eval_runs import Job, finished_runs, run_id, run_jobs

SECTIONS = ("table1", "table3", "table4", "fig4", "fig5", "auto")
AUTO = "auto"


@dataclass(frozen=True)
class EvalSettings:
    base: ModelConfig  # dims, windows, pool, d_u of the collective runs (n_items etc. come from the data)
    train: TrainConfig
    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = PAPER_MODELS
    hstu_max_len: int = 100
    d_user: int | str = 1  # Table 1 collective runs: an int or "auto"
    ablation_model: str = "sim"
    d_users: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    pools: tuple[int, ...] = (500, 2000, 5000, 10_000, 20_000)
    sections: tuple[str, ...] = SECTIONS
    auto_eps: float = 0.05
    cr_budget: float = 0.01
    auto_rows: int = 20_000
    workers: int = 1
    sample_fraction: float = 1.0  # < 1: a seeded random subset of every split's samples (quick runs)
    quick: bool = False

    def model_config(self, arch: str, **collective: Any) -> ModelConfig:
        """The base config for ``arch`` (HSTU gets its own window), collective fields replaced."""
        cfg = replace(self.base, arch=arch)  # type: ignore[arg-type]
        if arch == "hstu":
            cfg = replace(cfg, max_len=self.hstu_max_len)
        if collective:
            cfg = replace(cfg, collective=replace(cfg.collective, **collective))
        return cfg


def quick_settings(train: TrainConfig, **kw: Any) -> EvalSettings:
    """Tiny dims, one epoch, one seed and a subset of the sweeps: a CPU smoke run of every section."""

    base = ModelConfig(
        n_items=1,
        embed_dim=16,
        d_attn=32,
        n_heads=2,
        max_len=20,
        mlp_dims=(32,),
        long_len=100,
        topk=10,
        hash_bits=16,
        collective=CollectiveConfig(d_user=1, pool_size=64),
    )
    defaults: dict[str, Any] = dict(
        base=base,
        train=replace(train, epochs=1),
        seeds=(0,),
        hstu_max_len=32,
        d_users=(1, 2, 4),
        pools=(16, 64, 256),
        auto_rows=5000,
        sample_fraction=0.25,
        quick=True,
    )
    defaults.update(kw)
    return EvalSettings(**defaults)


# ----------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    section: str
    label: str
    arch: str
    cfg: ModelConfig | None  # None: collective with the per-seed auto d_u of ``arch``
    x: float | None = None  # the swept value (fig4: d_u, fig5: pool size)


def plan_rows(s: EvalSettings) -> list[Row]:
    rows: list[Row] = []
    a = s.ablation_model
    full_a = replace(s.model_config(a), kv_mode="full")
    coll = s.model_config(a)
    if "table1" in s.sections:
        for arch in s.models:
            rows.append(Row("table1", "full", arch, replace(s.model_config(arch), kv_mode="full")))
            if s.d_user == AUTO:
                rows.append(Row("table1", "collective", arch, None))
            else:
                rows.append(Row("table1", "collective", arch, s.model_config(arch, d_user=int(s.d_user))))
    if "table3" in s.sections:
        rows.append(Row("table3", "Baseline (full KV)", a, full_a))
        for label, peak, bal in (
            ("CollectiveKV (no router losses)", 0.0, 0.0),
            ("+peak loss", None, 0.0),
            ("+balance loss", 0.0, None),
            ("+all losses", None, None),
        ):
            c = coll.collective
            on = CollectiveConfig()  # the paper's weights where the base switches a loss off
            rows.append(
                Row(
                    "table3",
                    label,
                    a,
                    replace(
                        coll,
                        collective=replace(
                            c,
                            peak_weight=(c.peak_weight or on.peak_weight) if peak is None else peak,
                            balance_weight=(c.balance_weight or on.balance_weight) if bal is None else bal,
                        ),
                    ),
                )
            )
    if "table4" in s.sections:
        rows.append(Row("table4", "Baseline (full KV)", a, full_a))
        for label, sk, sv in (("CollectiveK", True, False), ("CollectiveV", False, True), ("CollectiveKV", True, True)):
            rows.append(Row("table4", label, a, s.model_config(a, share_k=sk, share_v=sv)))
    if "fig4" in s.sections or "auto" in s.sections:
        rows.append(Row("fig4", "full", a, full_a))
        for d in s.d_users:
            if d < s.base.d_attn:
                rows.append(Row("fig4", f"d_u={d}", a, s.model_config(a, d_user=d), x=d))
    if "fig5" in s.sections:
        rows.append(Row("fig5", "full", a, full_a))
        for p in s.pools:
            rows.append(Row("fig5", f"pool={p}", a, s.model_config(a, pool_size=p), x=p))
    if "auto" in s.sections:
        rows.append(Row("auto", "auto d_u", a, None))
    return rows


@dataclass
class EvalReport:
    settings: EvalSettings
    rows: list[Row]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    row_runs: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)  # (section, arch, label) → ids
    auto: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # arch → seed → choice
    trained_on: str | None = None  # device of run records written before records named theirs


def run_eval(data_dir: str | Path, settings: EvalSettings, out: str | Path, log: Any = print,
             train: bool = True, trained_on: str | None = None) -> dict[str, Any]:
    """Plan, train (resumably) and report every section; returns the results dict.

    ``train=False`` (``ckv eval --report-only``) trains nothing: the report covers the finished runs
    only, with the number of seeds behind every row, and lists the rows still pending; ``trained_on``
    names the device of run records that do not name it themselves."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    rows = plan_rows(s)
    rep = EvalReport(s, rows, trained_on=trained_on)
    data = str(Path(data_dir))
    t0 = time.perf_counter()
    auto_archs = sorted({r.arch for r in rows if r.cfg is None})
    auto_args = {
        "pool_size": s.base.collective.pool_size,
        "eps": s.auto_eps,
        "cr_budget": s.cr_budget,
        "max_rows": s.auto_rows,
    }

    def job(cfg: ModelConfig, seed: int, auto: bool = False) -> Job:
        rid = run_id(cfg, seed, s.train, s.sample_fraction)
        return Job(
            rid,
            cfg,
            seed,
            s.train,
            data,
            str(out / "runs" / f"{rid}.json"),
            auto_args if auto else None,
            s.sample_fraction,
        )

    # phase 1: full models whose K/V choose an auto d_u (also the Table 1 / ablation baselines)
    first = [job(replace(s.model_config(a), kv_mode="full"), seed, auto=True) for a in auto_archs for seed in s.seeds]
    execute = (lambda js: run_jobs(js, s.workers, log)) if train else finished_runs
    for r in execute(first):
        rep.records[r["id"]] = r
        rep.auto.setdefault(r["arch"], {})[r["seed"]] = r["auto"]
    # phase 2: every row
    jobs: list[Job] = []
    for row in rows:
        ids = []
        for seed in s.seeds:
            if row.cfg is None and seed not in rep.auto.get(row.arch, {}):
                continue  # report-only: the full model that picks this row's d_u has not run
            cfg = row.cfg or s.model_config(row.arch, d_user=rep.auto[row.arch][seed]["d_user"])
            j = job(cfg, seed, auto=any(x.rid == run_id(cfg, seed, s.train, s.sample_fraction) for x in first))
            ids.append(j.rid)
            if all(j.rid != x.rid for x in jobs):
                jobs.append(j)
        rep.row_runs[(row.section, row.arch, row.label)] = ids
    for r in execute(jobs):
        rep.records[r["id"]] = r
    results = summarise(rep)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot_sweep(results, "fig4", out / "fig4_d_user.png", "user-specific dims d_u", log_x=True)
    plot_sweep(results, "fig5", out / "fig5_pool.png", "global K/V pool size", log_x=True)
    return results


def planned_runs(s: EvalSettings) -> int:
    """Distinct (config, seed) runs the plan trains (an auto row counts once per seed)."""
    keys = set()
    for row in plan_rows(s):
        cfg_key = json.dumps(config_to_dict(row.cfg), sort_keys=True) if row.cfg else f"auto-{row.arch}"
        keys.update((cfg_key, seed) for seed in s.seeds)
    return len(keys)
