"""Training and evaluation of a CTR model on a canonical dataset (in-memory, single process).

Batches are drawn from the samples tables; each sample's history is the window of its user's
first ``hist_len`` events (:mod:`pipeline.data.history`), so no sample sees its own future.
Early stopping on validation GAUC (AUC, then logloss, when a small split leaves GAUC undefined:
:func:`stopping_metric`); the best epoch's weights are restored at the end.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import torch
from tqdm.auto import tqdm

from collectivekv.model.config import ModelConfig
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.events import EventSpec
from collectivekv.model.metrics import ctr_metrics
from collectivekv.model.zoo import create_model
from collectivekv.pipeline.data.dataset_schema import CanonicalDataset
from collectivekv.pipeline.data.history import HistoryIndex
from collectivekv.pipeline.training.diagnostics import TrainingDiagnostics
from collectivekv.pipeline.training.paired import UserAUC


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 2
    seed: int = 0
    eval_batch_size: int = 4096
    device: str = "cpu"
    progress: bool = True
    diagnostics: bool = True  # record a collective model's routing per epoch and at the end (no effect on training)
    probe_samples: int = 2048  # training samples whose routing is probed after every epoch


@dataclass
class TrainResult:
    model: TargetAttentionCTR
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    test_users: UserAUC | None = None  # per-user GAUC parts on the test split (paired comparisons)
    diagnostics: dict[str, Any] | None = None  # end-of-training routing figures (collective models)
    stopped_on: str = "gauc"  # the validation metric that ranked the epochs (stopping_metric)

    def metrics(self) -> dict[str, Any]:
        """The run's record (per-user parts excluded: they are written beside it)."""
        return {"best_epoch": self.best_epoch, "valid": self.valid, "test": self.test,
                **({"stopped_on": self.stopped_on} if self.stopped_on != "gauc" else {}),
                "history": self.history, "train_seconds": round(self.seconds, 2),
                **({"diagnostics": self.diagnostics} if self.diagnostics else {})}  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def item_genre_table(dataset: CanonicalDataset) -> torch.Tensor:
    """(n_items + 1, max_genres) int64 genre ids per dense item id, 0-padded (row 0 = padding)."""
    genres = dataset.items.column("genre_ids").combine_chunks()
    offsets = np.asarray(genres.offsets, dtype=np.int64)
    counts = np.diff(offsets)
    width = max(1, int(counts.max()) if len(counts) else 1)
    table = np.zeros((dataset.n_items + 1, width), dtype=np.int64)
    item_ids = dataset.items.column("item_id").to_numpy()
    rows = np.repeat(item_ids, counts)
    cols = np.arange(len(genres.values)) - np.repeat(offsets[:-1], counts)
    table[rows, cols] = np.asarray(genres.values, dtype=np.int64)
    return torch.from_numpy(table)


def build_model(dataset: CanonicalDataset, cfg: ModelConfig, seed: int = 0) -> TargetAttentionCTR:
    """A fresh model of ``cfg.arch`` (:mod:`model.zoo`) sized for ``dataset`` (cfg's n_items /
    n_genres / max_genres, and with per-event features the time unit, are replaced), initialised from ``seed``."""
    seed_everything(seed)
    genres = item_genre_table(dataset)

    cfg = replace(cfg, n_items=dataset.n_items, n_genres=dataset.n_genres, max_genres=genres.shape[1])
    if cfg.event_features:  # the features read the dataset's timestamps in its unit
        cfg = replace(cfg, event_time_unit=str((dataset.meta.get("time") or {}).get("unit") or "s"))
    return create_model(cfg, genres)  # type: ignore[return-value]


def sample_batches(
    index: HistoryIndex, samples: pa.Table, max_len: int, batch_size: int, rng: np.random.Generator | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tensors per batch: items, feedback, lengths, targets, labels, users (shuffled if rng)."""
    users = samples.column("user_id").to_numpy()
    targets = samples.column("item_id").to_numpy().astype(np.int64)
    labels = samples.column("label").to_numpy().astype(np.float32)
    hist_lens = samples.column("hist_len").to_numpy()
    order = rng.permutation(len(users)) if rng is not None else np.arange(len(users))
    for lo in range(0, len(order), batch_size):
        sel = order[lo : lo + batch_size]
        w = index.window(users[sel], hist_lens[sel], max_len)
        yield {
            "items": torch.from_numpy(w.items), "feedback": torch.from_numpy(w.feedback),
            "lengths": torch.from_numpy(w.lengths), "targets": torch.from_numpy(targets[sel]),
            "labels": torch.from_numpy(labels[sel]), "users": torch.from_numpy(users[sel]),
        }  # fmt: skip


@torch.no_grad()
def predict(model: TargetAttentionCTR, index: HistoryIndex, samples: pa.Table, batch_size: int) -> np.ndarray:
    """Click probabilities for every sample, in table order (eval mode, hard routing)."""
    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    for b in sample_batches(index, samples, model.cfg.window_len, batch_size, None):
        b = {k: v.to(device) for k, v in b.items()}
        logits, _ = model(b["items"], b["feedback"], b["lengths"], b["targets"])
        out.append(torch.sigmoid(logits).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(
    model: TargetAttentionCTR, index: HistoryIndex, samples: pa.Table, batch_size: int
) -> dict[str, float]:
    probs = predict(model, index, samples, batch_size)
    return ctr_metrics(samples.column("user_id").to_numpy(), samples.column("label").to_numpy(), probs)


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite."""


def stopping_metric(valid: pa.Table) -> str:
    """The validation metric that ranks epochs: GAUC when some user has both labels; else AUC when the split has
    both; else logloss; "epoch" (the last epoch is kept) for an empty split. A small split's GAUC is undefined,
    and ranking epochs by NaN kept the first one."""
    if valid.num_rows == 0:
        return "epoch"
    per_user = valid.group_by("user_id").aggregate([("label", "min"), ("label", "max")])
    if pa.compute.any(pa.compute.less(per_user["label_min"], per_user["label_max"])).as_py():
        return "gauc"
    return "auc" if pa.compute.count_distinct(valid["label"]).as_py() > 1 else "logloss"


def _epoch_score(valid: dict[str, float], metric: str, epoch: int) -> float:
    """Higher is better: the metric (minus logloss), or the epoch itself."""
    return float(epoch) if metric == "epoch" else -valid["logloss"] if metric == "logloss" else valid[metric]


def train_model(model: TargetAttentionCTR, dataset: CanonicalDataset, cfg: TrainConfig) -> TrainResult:
    """Adam on BCE + router losses; early stopping on validation GAUC; best weights restored. With
    ``cfg.diagnostics`` a collective model's routing is recorded too (:mod:`pipeline.training.diagnostics`)."""
    metric = stopping_metric(dataset.samples["valid"])
    seed_everything(cfg.seed)
    model.to(cfg.device)
    index = HistoryIndex(dataset.histories, EventSpec.of(model.cfg))
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = dataset.samples["train"]
    diag = TrainingDiagnostics.of(model, index, train, cfg.probe_samples, cfg.seed) if cfg.diagnostics else None
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        row = {"epoch": epoch, **_train_epoch(model, opt, index, train, cfg, rng, epoch, diag)}
        valid = evaluate(model, index, dataset.samples["valid"], cfg.eval_batch_size)
        row.update({f"valid_{k}": v for k, v in valid.items()})
        if diag is not None:
            row.update(diag.epoch_end())
        history.append(row)
        if cfg.progress:
            tqdm.write(
                f"epoch {epoch}: loss {row['loss']:.4f} valid gauc {valid['gauc']:.4f} auc {valid['auc']:.4f}"
            )
        score = _epoch_score(valid, metric, epoch)
        if best is None or score > best[0]:
            best = (
                score,
                epoch,
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            )
        elif epoch - best[1] >= cfg.patience:
            break
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    valid = evaluate(model, index, dataset.samples["valid"], cfg.eval_batch_size)
    test_samples = dataset.samples["test"]
    probs = predict(model, index, test_samples, cfg.eval_batch_size)
    users, labels = test_samples.column("user_id").to_numpy(), test_samples.column("label").to_numpy()
    seconds = time.perf_counter() - t0
    return TrainResult(model, best[1], valid, ctr_metrics(users, labels, probs), history, seconds,
                       test_users=UserAUC.of(users, labels, probs), diagnostics=diag.final() if diag else None,
                       stopped_on=metric)


def _train_epoch(model: TargetAttentionCTR, opt: torch.optim.Optimizer, index: HistoryIndex, train: pa.Table,
                 cfg: TrainConfig, rng: np.random.Generator, epoch: int, diag: TrainingDiagnostics | None
                 ) -> dict[str, float]:
    """One pass over the training samples; the epoch's mean loss and router losses."""
    model.train()
    n_batches = -(-train.num_rows // cfg.batch_size)
    sums = np.zeros(3)
    bar = tqdm(sample_batches(index, train, model.cfg.window_len, cfg.batch_size, rng), total=n_batches,
               desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, leave=False)  # fmt: skip
    for b in bar:
        b = {k: v.to(cfg.device, non_blocking=True) for k, v in b.items()}
        logits, losses = model(b["items"], b["feedback"], b["lengths"], b["targets"])
        loss = model.loss(logits, b["labels"], losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if diag is not None:
            diag.after_backward()
        opt.step()
        step = torch.stack([loss.detach(), losses.peak.detach(), losses.balance.detach()]).tolist()  # one sync
        if not np.isfinite(step[0]):
            raise TrainingDiverged(f"the training loss became {step[0]} in epoch {epoch}: the model diverged (try a "
                                   f"lower --lr than {cfg.lr:g})")
        sums += step
        bar.set_postfix(loss=f"{step[0]:.4f}")
    return {"loss": sums[0] / n_batches, "peak": sums[1] / n_batches, "balance": sums[2] / n_batches}
