"""`ckv train` (one model) and `ckv experiment` (variants × seeds → results table).

Thin shells: parse options, build ModelConfig / TrainConfig, call pipeline.training.trainer / experiment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from collectivekv.model.config import CollectiveConfig, ModelConfig


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that builds a ModelConfig."""
    opts = [
        click.option("--arch", type=click.Choice(["din", "sim", "eta", "sdim", "twin", "hstu"]), default="din",
                     show_default=True, help="model (docs/model_zoo.md)"),
        click.option("--max-len", default=50, show_default=True,
                     help="behaviours attended (L); sim/eta/sdim/twin: the short window; hstu: the sequence"),
        click.option("--long-len", default=1000, show_default=True, help="sim/eta/sdim/twin: long window"),
        click.option("--topk", default=50, show_default=True, help="sim/eta/twin: behaviours retrieved"),
        click.option("--hash-bits", default=16, show_default=True, help="eta: SimHash bits"),
        click.option("--retrieval-keys", type=click.Choice(["item", "pool"]), default="item", show_default=True,
                     help="sim/eta/sdim: each behaviour's retrieval key from its item (cached per behaviour) or "
                          "from its long router index (no key cached; collective models)"),
        click.option("--sdim-hashes", default=4, show_default=True),
        click.option("--sdim-bits", default=4, show_default=True),
        click.option("--hstu-layers", default=2, show_default=True),
        click.option("--embed-dim", default=64, show_default=True),
        click.option("--d-attn", default=256, show_default=True, help="attention dim d_a"),
        click.option("--heads", default=8, show_default=True),
        click.option("--d-user", default="1", show_default=True,
                     help="user-specific dims d_u, or 'auto' (ckv train: chosen from a full model trained first)"),
        click.option("--pool-size", default=10_000, show_default=True),
        click.option("--share", type=click.Choice(["both", "k", "v"]), default="both", show_default=True),
        click.option("--kv-index", type=click.Choice(["separate", "joint"]), default="separate", show_default=True,
                     help="joint: one router index per behaviour for K and V, one pool holding both (needs --share "
                          "both; docs/model_zoo.md, 'Half the cache')"),
        click.option("--user-dtype", type=click.Choice(["float", "int8"]), default="float", show_default=True,
                     help="int8: the shared user parts are fake-quantised in training and cached as int8 codes"),
        click.option("--peak-weight", default=0.01, show_default=True),
        click.option("--balance-weight", default=1.0, show_default=True),
        click.option("--dropout", default=0.0, show_default=True, help="dropout of the MLP head"),
        click.option("--event-features", default="", show_default=True,
                     help="per-event features in the behaviour token: gap and/or hour, e.g. gap,hour "
                          "(model/events.py; docs/model_zoo.md)"),
        click.option("--gap-buckets", default=16, show_default=True, help="log buckets of the gap feature"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


COUNT, RATE = click.IntRange(min=1), click.FloatRange(min=0)


def train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
                     help="canonical dataset (ckv data prepare)"),
        click.option("--epochs", type=COUNT, default=8, show_default=True),
        click.option("--batch-size", type=COUNT, default=1024, show_default=True),
        click.option("--lr", type=RATE, default=1e-3, show_default=True),
        click.option("--patience", type=COUNT, default=2, show_default=True, help="early stopping on valid GAUC"),
        click.option("--weight-decay", default=0.0, show_default=True, help="Adam L2 weight decay"),
        click.option("--device", default="cpu", show_default=True, help="cpu | cuda | auto"),
        click.option("--progress/--no-progress", default=True),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_d_user(value: str) -> int | str:
    """``--d-user`` (ckv train, experiment, eval): an integer, or 'auto'; BadParameter (a usage error) otherwise."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"an integer or 'auto', got {value!r}", param_hint="--d-user") from None


def build_model_config(kv_mode: str, kw: dict[str, Any], d_user: int = 1) -> ModelConfig:
    """The one place CLI options become a ModelConfig (ckv train / experiment / eval): ``kw`` holds the
    :func:`model_options` values (``dropout`` optional); n_items is 1 until the dataset sets it.
    ``d_user`` is used when ``kw["d_user"]`` is 'auto' (not an integer)."""
    du = parse_d_user(str(kw["d_user"]))
    coll = CollectiveConfig(
        d_user=du if isinstance(du, int) else d_user, pool_size=kw["pool_size"], share_k=kw["share"] in ("both", "k"),
        share_v=kw["share"] in ("both", "v"), peak_weight=kw["peak_weight"], balance_weight=kw["balance_weight"],
    )  # fmt: skip
    try:
        return _model_config(kv_mode, kw, coll)
    except ValueError as exc:  # e.g. an unknown --event-features name
        raise click.BadParameter(str(exc)) from exc


def _model_config(kv_mode: str, kw: dict[str, Any], coll: CollectiveConfig) -> ModelConfig:
    return ModelConfig(
        n_items=1, embed_dim=kw["embed_dim"], d_attn=kw["d_attn"], n_heads=kw["heads"], max_len=kw["max_len"],
        kv_mode=kv_mode, collective=coll, arch=kw["arch"], long_len=kw["long_len"], topk=kw["topk"],
        hash_bits=kw["hash_bits"], sdim_hashes=kw["sdim_hashes"], sdim_bits=kw["sdim_bits"],
        hstu_layers=kw["hstu_layers"], dropout=kw.get("dropout", 0.0),  # type: ignore[arg-type]
        event_features=tuple(f.strip() for f in str(kw.get("event_features") or "").split(",") if f.strip()),
        gap_buckets=kw.get("gap_buckets", 16), kv_index=kw.get("kv_index", "separate"),
        user_dtype=kw.get("user_dtype", "float"), retrieval_keys=kw.get("retrieval_keys", "item"),
    )  # fmt: skip


def int_list(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of distinct integers (--seeds 0,1,2); anything else is a one-line usage error."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers", param_hint=option) from None
    if not values or len(set(values)) != len(values):
        raise click.BadParameter(f"{text!r}: expected at least one value, each once", param_hint=option)
    return values


def training_device(device: str, need: bool = True) -> str:
    """--device of a training command: "auto" resolved; a device torch does not know, or CUDA without a GPU
    (when ``need``: something will run on it), is a one-line error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{device!r}: expected cpu, cuda, cuda:N or auto", param_hint="--device") from None
    if kind == "cuda" and need and not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: no CUDA device is available")
    return device


def build_train_config(kw: dict[str, Any], seed: int) -> Any:
    from collectivekv.pipeline.training.trainer import TrainConfig

    device = training_device(kw["device"])
    return TrainConfig(epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"], patience=kw["patience"],
                       weight_decay=kw.get("weight_decay", 0.0), seed=seed, device=device,
                       progress=kw["progress"])  # fmt: skip


@click.command()
@train_options
@model_options
@click.option("--kv-mode", type=click.Choice(["full", "collective"]), default="collective", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--init-from", type=click.Path(exists=True, file_okay=False),
              help="warm-start checkpoint (same model options; item / genre rows matched by raw id)")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="checkpoint directory to write: new, empty, or a checkpoint to replace with --overwrite")
@click.option("--overwrite", is_flag=True, help="replace an existing checkpoint at --out (atomically, on success)")
def train(kv_mode: str, seed: int, init_from: str | None, out: str, overwrite: bool, data_dir: str,
          **kw: Any) -> None:
    """Train one model; write a checkpoint (weights, config, metrics, model version)."""
    from collectivekv.cachestore.checkpoint import CheckpointError, load_checkpoint
    from collectivekv.pipeline.data.dataset_schema import DataError, load_dataset
    from collectivekv.pipeline.store.safe_output import OutputError, check_output_dir
    from collectivekv.pipeline.training.checkpoint import CHECKPOINT_OUTPUT, save_checkpoint
    from collectivekv.pipeline.training.trainer import build_model, train_model
    from collectivekv.pipeline.training.warm_start import WarmStartError, warm_start

    inputs = (data_dir, init_from)
    try:
        check_output_dir(Path(out), CHECKPOINT_OUTPUT, overwrite=overwrite, inputs=inputs)  # before training
        dataset = load_dataset(data_dir)
        cfg = build_model_config(kv_mode, kw)
        auto = None
        if parse_d_user(str(kw["d_user"])) == "auto" and kv_mode == "collective":
            if init_from:
                raise click.ClickException("--d-user auto trains its own full model first: no --init-from")
            auto = choose_auto_d_user(dataset, cfg, kw, seed)
            cfg = build_model_config(kv_mode, kw, d_user=auto["d_user"])
        model = build_model(dataset, cfg, seed)
        warm = None
        if init_from:  # item / genre rows matched by raw id through the two catalogues
            warm = warm_start(model, load_checkpoint(init_from), dataset.catalogue).as_dict()
    except (DataError, CheckpointError, WarmStartError, OutputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        result = train_model(model, dataset, build_train_config(kw, seed))
    except ValueError as exc:  # a valid split that cannot rank epochs; a diverged loss
        raise click.ClickException(str(exc)) from exc
    metrics = {**result.metrics(), "init_from": init_from, "seed": seed, **({"d_user_auto": auto} if auto else {}),
               **({"warm_start": warm} if warm else {})}
    try:
        version = save_checkpoint(out, result.model, metrics, dataset.catalogue, overwrite=overwrite, inputs=inputs)
    except OutputError as exc:  # --out changed while training
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"checkpoint": out, "model_version": version, "test": result.test}, indent=2))


def choose_auto_d_user(dataset: Any, cfg: ModelConfig, kw: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train the full model of ``cfg`` and pick d_u from its K/V (pipeline.training.zoo_eval_runs.auto_d_user)."""
    from collectivekv.pipeline.training.trainer import build_model, train_model
    from collectivekv.pipeline.training.zoo_eval_runs import auto_d_user

    click.echo("--d-user auto: training the full model first")
    full = train_model(build_model(dataset, replace(cfg, kv_mode="full"), seed), dataset, build_train_config(kw, seed))
    choice = auto_d_user(full.model, dataset, cfg.collective.pool_size, eps=0.05, cr_budget=0.01, max_rows=20_000,
                         seed=seed)  # fmt: skip
    click.echo(f"--d-user auto: d_u = {choice['d_user']} (spectral {choice['spectral']}, CR cap {choice['cr_cap']}); "
               f"full model test {full.test}")  # fmt: skip
    return choice


@click.command()
@train_options
@model_options
@click.option(
    "--variants", default="full,collective", show_default=True, help="full,collective,share_k,share_v"
)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="experiment directory: new, empty, or an experiment to replace with --overwrite")
@click.option("--overwrite", is_flag=True, help="replace an existing experiment at --out (atomically, on success)")
def experiment(variants: str, seeds: str, out: str, overwrite: bool, data_dir: str, **kw: Any) -> None:
    """Train variants × seeds; write checkpoints and results.{md,json} (mean ± std, CR)."""
    from collectivekv.pipeline.data.dataset_schema import DataError, load_dataset
    from collectivekv.pipeline.store.safe_output import OutputError, check_output_dir
    from collectivekv.pipeline.training.experiment import EXPERIMENT_OUTPUT, run_experiment, standard_variants

    if parse_d_user(str(kw["d_user"])) == "auto":
        raise click.ClickException("--d-user auto: use `ckv train` or `ckv eval` (experiment takes a fixed d_u)")
    try:
        check_output_dir(Path(out), EXPERIMENT_OUTPUT, overwrite=overwrite, inputs=(data_dir,))
        dataset = load_dataset(data_dir)
        names = [v for v in variants.split(",") if v]
        if len(set(names)) != len(names):
            raise click.BadParameter(f"{variants!r}: a variant named twice", param_hint="--variants")
        chosen = standard_variants(build_model_config("collective", kw), names)
    except (DataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    seed_list = list(int_list(seeds, "--seeds"))
    try:
        report = run_experiment(dataset, chosen, seed_list, build_train_config(kw, seed_list[0]), Path(out),
                                overwrite=overwrite, inputs=(data_dir,))
    except (OutputError, ValueError) as exc:  # --out changed while training; a split or loss training refuses
        raise click.ClickException(str(exc)) from exc
    click.echo((Path(out) / "results.md").read_text())
    del report
