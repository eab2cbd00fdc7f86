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
skipped when the job is run again (resume after an interruption); its per-user test GAUC parts go to
``OUT/runs/users/<id>.json`` (the paired comparisons of the report: :mod:`pipeline.training.paired`). The
report is ``OUT/results.json`` + ``OUT/results.md`` + ``OUT/fig4_d_user.png`` + ``OUT/fig5_pool.png``.
With ``workers > 1`` runs go to that many processes (spawned; they share the device).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from collectivekv.model.config import ModelConfig, config_to_dict
from collectivekv.pipeline.data.dataset_schema import read_meta
from collectivekv.pipeline.store.safe_output import OutputKind
from collectivekv.pipeline.training.paired import UserAUC
from collectivekv.pipeline.training.zoo_eval_plan import (  # noqa: F401  (re-exported: the plan is part of this API)
    AUTO,
    SECTIONS,
    EvalReport,
    EvalSettings,
    Row,
    plan_rows,
    quick_settings,
)
from collectivekv.pipeline.training.zoo_eval_report import markdown, plot_sweep, summarise
from collectivekv.pipeline.training.zoo_eval_runs import (
    Job,
    data_fingerprint,
    finished_runs,
    run_id,
    run_jobs,
    users_file,
)

# what `ckv eval` writes into --out; an evaluation there is resumed (its finished runs kept), anything else refused
EVAL_OUTPUT = OutputKind("evaluation", "ckv eval",
                         frozenset({"runs", "results.json", "results.md", "fig4_d_user.png", "fig5_pool.png"}),
                         signature=("runs",), nested=("runs/*.json", "runs/*.tmp", "runs/users/*.json",
                                                      "runs/users/*.tmp"))


def run_eval(data_dir: str | Path, settings: EvalSettings, out: str | Path, log: Any = print,
             train: bool = True, trained_on: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Plan, train (resumably) and report every section; returns the results dict.

    ``train=False`` (``ckv eval --report-only``) trains nothing: the report covers the finished runs
    only, with the number of seeds behind every row, and lists the rows still pending; ``trained_on``
    names the device of run records that do not name it themselves; ``command`` (the command line) is
    recorded in the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    rows = plan_rows(s)
    rep = EvalReport(s, rows, trained_on=trained_on)
    data = str(Path(data_dir))
    data_fp = data_fingerprint(data)
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
            data_fp=data_fp,
        )

    # phase 1: full models whose K/V choose an auto d_u (also the Table 1 / ablation baselines)
    first = [job(replace(s.model_config(a), kv_mode="full"), seed, auto=True) for a in auto_archs for seed in s.seeds]
    execute = (lambda js: run_jobs(js, s.workers, log)) if train else finished_runs
    for r in execute(first):
        rep.records[r["id"]] = r
        rep.auto.setdefault(r["arch"], {})[r["seed"]] = r["auto"]
    # phase 2: every row
    jobs = _row_jobs(rows, s, rep, first, job)
    for r in execute(jobs):
        rep.records[r["id"]] = r
    for rid in rep.records:
        parts = UserAUC.load(users_file(out / "runs" / f"{rid}.json"))
        if parts is not None:
            rep.users[rid] = parts
    rep.data = dataset_info(data)
    results = summarise(rep)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if command:
        results.update(_commands(out, command, train))
    _write_results(out, results)
    return results


def _row_jobs(rows: list[Any], s: EvalSettings, rep: EvalReport, first: list[Job], job: Any) -> list[Job]:
    """The runs behind every row (each once; rows map to their run ids in ``rep.row_runs``); a row whose d_u
    the auto phase picks waits for it (report-only: skipped when that run is missing)."""
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
    return jobs


def dataset_info(data_dir: str | Path) -> dict[str, Any]:
    """The split (``meta["splits"]``, kind "global" when unrecorded) and the test split's size of a dataset."""
    meta = read_meta(data_dir)
    test = meta.get("counts", {}).get("test", {})
    return {"splits": {"kind": "global", **meta.get("splits", {})}, "test_samples": test.get("samples"),
            "test_users": test.get("users")}


def _commands(out: Path, command: str, train: bool) -> dict[str, str]:
    """{"command"} of this run, and {"trained_by"} the command that trained the runs of a report re-rendered from
    them (``train`` False) when the report already in ``out`` names another one."""
    trained_by = None if train else _training_command(out)
    return {"command": command, **({"trained_by": trained_by} if trained_by and trained_by != command else {})}


def _training_command(out: Path) -> str | None:
    """The command that trained the runs of the report already in ``out`` (its ``trained_by``, or its command when
    that one trained), None without a report."""
    path = out / "results.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    command = old.get("trained_by") or old.get("command")
    return None if command is None or "--report-only" in command.split() else command


def _write_results(out: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and the two sweep plots in ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot_sweep(results, "fig4", out / "fig4_d_user.png", "user-specific dims d_u", log_x=True)
    plot_sweep(results, "fig5", out / "fig5_pool.png", "global K/V pool size", log_x=True)


def planned_runs(s: EvalSettings) -> int:
    """Distinct (config, seed) runs the plan trains (an auto row counts once per seed)."""
    keys = set()
    for row in plan_rows(s):
        cfg_key = json.dumps(config_to_dict(row.cfg), sort_keys=True) if row.cfg else f"auto-{row.arch}"
        keys.update((cfg_key, seed) for seed in s.seeds)
    return len(keys)
