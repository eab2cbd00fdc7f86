"""`ckv train` (one model) and `ckv experiment` (variants × seeds → results table).

Thin shells: parse options, build ModelConfig / TrainConfig, call pipeline.trainer / experiment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from model.config import CollectiveConfig, ModelConfig


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that builds a ModelConfig."""
    opts = [
        click.option("--max-len", default=50, show_default=True, help="behaviours attended (L)"),
        click.option("--embed-dim", default=64, show_default=True),
        click.option("--d-attn", default=256, show_default=True, help="attention dim d_a"),
        click.option("--heads", default=8, show_default=True),
        click.option("--d-user", default=1, show_default=True, help="user-specific dims d_u"),
        click.option("--pool-size", default=10_000, show_default=True),
        click.option("--share", type=click.Choice(["both", "k", "v"]), default="both", show_default=True),
        click.option("--peak-weight", default=0.01, show_default=True),
        click.option("--balance-weight", default=1.0, show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
                     help="canonical dataset (ckv data prepare)"),
        click.option("--epochs", default=8, show_default=True),
        click.option("--batch-size", default=1024, show_default=True),
        click.option("--lr", default=1e-3, show_default=True),
        click.option("--patience", default=2, show_default=True, help="early stopping on valid GAUC"),
        click.option("--device", default="cpu", show_default=True, help="cpu | cuda | auto"),
        click.option("--progress/--no-progress", default=True),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_model_config(kv_mode: str, kw: dict[str, Any]) -> ModelConfig:
    coll = CollectiveConfig(
        d_user=kw["d_user"], pool_size=kw["pool_size"], share_k=kw["share"] in ("both", "k"),
        share_v=kw["share"] in ("both", "v"), peak_weight=kw["peak_weight"], balance_weight=kw["balance_weight"],
    )  # fmt: skip
    return ModelConfig(
        n_items=1, embed_dim=kw["embed_dim"], d_attn=kw["d_attn"], n_heads=kw["heads"], max_len=kw["max_len"],
        kv_mode=kv_mode, collective=coll,  # type: ignore[arg-type]
    )  # fmt: skip


def build_train_config(kw: dict[str, Any], seed: int) -> Any:
    import torch

    from pipeline.trainer import TrainConfig

    device = kw["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TrainConfig(epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"], patience=kw["patience"],
                       seed=seed, device=device, progress=kw["progress"])  # fmt: skip


@click.command()
@train_options
@model_options
@click.option("--kv-mode", type=click.Choice(["full", "collective"]), default="collective", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), help="warm-start checkpoint")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="checkpoint directory to write")
def train(kv_mode: str, seed: int, init_from: str | None, out: str, data_dir: str, **kw: Any) -> None:
    """Train one model; write a checkpoint (weights, config, metrics, model version)."""
    from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from pipeline.dataset_schema import DataError, load_dataset
    from pipeline.trainer import build_model, train_model

    try:
        dataset = load_dataset(data_dir)
        cfg = build_model_config(kv_mode, kw)
        model = build_model(dataset, cfg, seed)
        if init_from:
            prev = load_checkpoint(init_from)
            if replace(prev.config, dropout=model.cfg.dropout) != model.cfg:
                raise click.ClickException(
                    f"--init-from {init_from}: its config differs from this run's; warm start needs the "
                    f"same model shape (checkpoint: {prev.config}, run: {model.cfg})"
                )
            model.load_state_dict(prev.model.state_dict())
    except (DataError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from exc
    result = train_model(model, dataset, build_train_config(kw, seed))
    metrics = {**result.metrics(), "init_from": init_from, "seed": seed}
    version = save_checkpoint(out, result.model, metrics)
    click.echo(json.dumps({"checkpoint": out, "model_version": version, "test": result.test}, indent=2))


@click.command()
@train_options
@model_options
@click.option(
    "--variants", default="full,collective", show_default=True, help="full,collective,share_k,share_v"
)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
def experiment(variants: str, seeds: str, out: str, data_dir: str, **kw: Any) -> None:
    """Train variants × seeds; write checkpoints and results.{md,json} (mean ± std, CR)."""
    from pipeline.dataset_schema import DataError, load_dataset
    from pipeline.experiment import run_experiment, standard_variants

    try:
        dataset = load_dataset(data_dir)
        chosen = standard_variants(
            build_model_config("collective", kw), [v for v in variants.split(",") if v]
        )
    except (DataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    seed_list = [int(s) for s in seeds.split(",") if s]
    report = run_experiment(dataset, chosen, seed_list, build_train_config(kw, seed_list[0]), Path(out))
    click.echo((Path(out) / "results.md").read_text())
    del report
