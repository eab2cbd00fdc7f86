"""`ckv eval`: the paper's evaluation (Tables 1, 3, 4; Figures 4, 5; `--d-user auto`) on a canonical
dataset, by default the bundled MovieLens. Thin shell over :mod:`pipeline.training.zoo_eval`.

    ckv eval --device cuda                 # the full evaluation, 3 seeds → runs/eval/
    ckv eval --quick --out runs/eval_quick # CPU smoke run: tiny dims, 1 epoch, 1 seed, a subset of the sweeps
    ckv eval --split per-user              # the bundled MovieLens with every user's last events as test

The report gives mean ± std over seeds, each variant's paired GAUC difference from the full model (same
seed; bootstrap interval over test users), the collective runs' training diagnostics and per-epoch curves.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from collectivekv.jobs.train import COUNT, RATE, int_list, training_device

BUNDLED_EVENTS = Path("data/movielens/ratings.csv")
BUNDLED_ITEMS = Path("data/movielens/movies.csv")


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def bundled_dataset(path: Path, split: str = "global") -> Path:
    """The bundled MovieLens prepared into ``path`` with ``split`` ("global", or "per-user": each user's
    last 10 events test, the 10 before valid) (reused when it is already there)."""
    from collectivekv.pipeline.data.prepare import PrepareConfig, prepare

    if not (path / "meta.json").is_file():
        prepare(
            PrepareConfig(events=BUNDLED_EVENTS, items=BUNDLED_ITEMS, out=path, rating_col="rating",
                          rating_threshold=4.0, split=split)
        )
    return path


def eval_data(data_dir: str | None, split: str | None) -> Path:
    """``--data`` (its own split; ``--split`` must agree when given) or the bundled MovieLens with ``--split``
    (runs/movielens_data, runs/movielens_data_per_user)."""
    from collectivekv.pipeline.data.dataset_schema import DataError, read_meta

    if data_dir is None:
        split = split or "global"
        return bundled_dataset(Path("runs/movielens_data" + ("" if split == "global" else "_per_user")), split)
    try:
        meta = read_meta(data_dir)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    kind = meta.get("splits", {}).get("kind", "global")
    if split is not None and split != kind:
        raise click.ClickException(f"--split {split}: {data_dir} has a {kind} split (ckv data prepare --split)")
    return Path(data_dir)


@click.command("eval")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False),
    help="canonical dataset (default: the bundled MovieLens, prepared into runs/movielens_data)",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="output directory [default: runs/eval, with --quick runs/eval_quick]",
)
@click.option("--split", type=click.Choice(["global", "per-user"]), default=None,
              help="test split: global time cut, or each user's last events (per-user; ckv data prepare --split) "
              "[default: the --data dataset's own; the bundled MovieLens: global]")
@click.option("--quick", is_flag=True, help="smoke run: tiny dims, 1 epoch, 1 seed, a subset of the sweeps")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | auto")
@click.option("--workers", default=1, show_default=True, help="runs trained in parallel processes (same device)")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--models", default="sim,eta,sdim,twin,hstu", show_default=True, help="Table 1 models (din too)")
@click.option("--sections", default="table1,table3,table4,fig4,fig5,auto", show_default=True)
@click.option("--d-user", default="1", show_default=True, help="Table 1 collective d_u: an integer or 'auto'")
@click.option("--ablation-model", default="sim", show_default=True, help="model of tables 3/4, figures 4/5, auto")
@click.option("--d-users", default="1,2,4,8,16,32", show_default=True, help="figure 4 sweep")
@click.option("--pools", default="500,2000,5000,10000,20000", show_default=True, help="figure 5 sweep")
@click.option("--pool-size", default=10_000, show_default=True)
@click.option("--kv-index", type=click.Choice(["separate", "joint"]), default="separate", show_default=True,
              help="joint: one router index for K and V (rows sharing both sides; the others keep separate indices)")
@click.option("--user-dtype", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="int8: shared user parts fake-quantised in training, cached as int8 codes")
@click.option("--embed-dim", default=64, show_default=True)
@click.option("--d-attn", default=256, show_default=True)
@click.option("--heads", default=8, show_default=True)
@click.option("--max-len", default=50, show_default=True, help="short-sequence window of sim/eta/sdim/twin")
@click.option("--long-len", default=1000, show_default=True, help="long-sequence window of sim/eta/sdim/twin")
@click.option("--topk", default=50, show_default=True)
@click.option("--hash-bits", default=16, show_default=True, help="ETA SimHash bits")
@click.option("--retrieval-keys", type=click.Choice(["item", "pool"]), default="item", show_default=True,
              help="SIM / ETA / SDIM: keys from the items, or (collective runs) from the long router index")
@click.option("--sdim-hashes", default=4, show_default=True)
@click.option("--sdim-bits", default=4, show_default=True)
@click.option("--hstu-len", default=100, show_default=True, help="HSTU sequence window")
@click.option("--hstu-layers", default=2, show_default=True)
@click.option("--epochs", type=COUNT, default=5, show_default=True)
@click.option("--patience", type=COUNT, default=1, show_default=True, help="early stopping on validation GAUC")
@click.option("--batch-size", type=COUNT, default=1024, show_default=True)
@click.option("--lr", type=RATE, default=1e-3, show_default=True)
@click.option("--weight-decay", default=0.0, show_default=True, help="Adam L2 weight decay, every run")
@click.option("--dropout", default=0.0, show_default=True, help="dropout of the MLP head, every run")
@click.option("--event-features", default="", show_default=True,
              help="per-event features of every run: gap and/or hour (model/events.py)")
@click.option("--gap-buckets", default=16, show_default=True, help="log buckets of the gap feature")
@click.option("--peak-weight", default=0.01, show_default=True,
              help="router peak-loss weight of the collective runs (Table 3 varies it itself)")
@click.option("--balance-weight", default=1.0, show_default=True,
              help="router load-balance-loss weight of the collective runs (Table 3 varies it itself)")
@click.option("--auto-eps", default=0.05, show_default=True, help="d_u auto: held-out energy left to the pool")
@click.option("--cr-budget", default=0.01, show_default=True, help="d_u auto: largest CR allowed")
@click.option("--progress/--no-progress", default=False)
@click.option("--report-only", is_flag=True, help="train nothing: report the finished runs, list the pending ones")
@click.option("--trained-on", default=None, help="with --report-only: device of old run records that do not name it")
def eval_cmd(data_dir: str | None, split: str | None, out: str | None, quick: bool, device: str,
             report_only: bool, trained_on: str | None, **kw: Any) -> None:
    """Reproduce the paper's tables and figures for every zoo model (resumable; see pipeline/training/zoo_eval.py)."""
    from collectivekv.jobs.train import parse_d_user
    from collectivekv.model.zoo import MODELS
    from collectivekv.pipeline.data.dataset_schema import DataError
    from collectivekv.pipeline.store.safe_output import OutputError, check_output_dir
    from collectivekv.pipeline.training.trainer import TrainConfig
    from collectivekv.pipeline.training.zoo_eval import EVAL_OUTPUT, SECTIONS, planned_runs, run_eval

    device = training_device(device, need=not report_only)
    models, sections = _names(kw["models"]), _names(kw["sections"])
    bad = [m for m in (*models, kw["ablation_model"]) if m not in MODELS] + [s for s in sections if s not in SECTIONS]
    if bad:
        raise click.ClickException(f"unknown model(s)/section(s) {bad}; models: {sorted(MODELS)}, sections: {SECTIONS}")
    d_user = parse_d_user(str(kw["d_user"]))
    train = TrainConfig(
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        weight_decay=kw["weight_decay"],
        patience=kw["patience"],
        device=device,
        progress=kw["progress"],
        eval_batch_size=kw["batch_size"],
    )
    common: dict[str, Any] = dict(
        models=models,
        sections=sections,
        d_user=d_user,
        seeds=int_list(kw["seeds"], "--seeds"),
        ablation_model=kw["ablation_model"],
        workers=kw["workers"],
        auto_eps=kw["auto_eps"],
        cr_budget=kw["cr_budget"],
    )
    try:
        settings = _eval_settings(quick, train, common, kw)
        out_dir = Path(out or ("runs/eval_quick" if quick else "runs/eval"))
        data = eval_data(data_dir, split)
        check_output_dir(out_dir, EVAL_OUTPUT, overwrite=True, inputs=(data,))  # new, empty, or an evaluation
        click.echo(
            f"ckv eval: {planned_runs(settings)} runs planned on {device} → {out_dir}"
            + (" (QUICK smoke run)" if quick else "")
        )
        run_eval(data, settings, out_dir, log=click.echo, train=not report_only, trained_on=trained_on,
                 command=" ".join(["ckv", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else None)
    except (DataError, ValueError, OutputError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo((out_dir / "results.md").read_text())


def _eval_settings(quick: bool, train: Any, common: dict[str, Any], kw: dict[str, Any]) -> Any:
    """The :class:`pipeline.training.zoo_eval.EvalSettings` of the options (the quick smoke run's, or the full
    evaluation's), with the regularisation and router-loss weights of every run."""
    from collectivekv.jobs.train import build_model_config
    from collectivekv.pipeline.training.zoo_eval import EvalSettings, quick_settings

    if quick:
        common["seeds"] = common["seeds"][:1]
        settings = quick_settings(train, **common)
    else:
        # d_u 1 everywhere but Table 1's collective rows (--d-user, set there): a full run does not
        # depend on d_u, and with one base its run id (the cache key of finished runs) stays the same;
        # every section sets the arch (and Table 4 the sharing) of its rows itself
        base = build_model_config("collective", {**kw, "d_user": "1", "arch": "din", "share": "both"})
        settings = EvalSettings(
            base=base,
            train=train,
            hstu_max_len=kw["hstu_len"],
            d_users=int_list(kw["d_users"], "--d-users"),
            pools=int_list(kw["pools"], "--pools"),
            **common,
        )
    base = settings.base  # regularisation, router-loss weights and event features of every run (quick ones too)
    events = build_model_config("collective", {**kw, "d_user": "1", "arch": "din", "share": "both"})
    return replace(settings, base=replace(base, dropout=kw["dropout"], collective=replace(
        base.collective, peak_weight=kw["peak_weight"], balance_weight=kw["balance_weight"]),
        kv_index=kw["kv_index"], user_dtype=kw["user_dtype"], retrieval_keys=kw["retrieval_keys"],
        event_features=events.event_features, gap_buckets=events.gap_buckets))
