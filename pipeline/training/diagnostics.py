"""Training diagnostics of a CollectiveKV run (``TrainConfig.diagnostics``, on by default; full-KV runs
have no pools and get none).

- Per epoch (a row of the run's ``history``, beside the validation GAUC/AUC/Logloss): the routing of a
  fixed random sample of ``probe_samples`` training samples' histories (``router_entropy_norm``,
  ``router_max_prob``, ``gate_gap``, ``probe_rows_used``) and ``grad_rows``, the fraction of pool rows
  that received a gradient in at least one step of the epoch.
- At the end (best weights restored): the routing over every training sample's history (each
  behaviour of every sample's window counts, as in the training loss) — rows used, top-1% rows'
  share of the usage, usage entropy, router entropy, mean |1 − gate| — and the gradient counts of the
  last epoch trained.

Probing runs the model's prefill in eval mode without gradients on a generator of its own, so a run
trains exactly the same with or without diagnostics. Figures: :mod:`model.diagnostics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from collectivekv.model.diagnostics import GradientCounter, RoutingProbe, shared_branches
from collectivekv.pipeline.data.history import HistoryIndex

PROBE_BATCH = 256  # samples per probing prefill (router logits are (behaviours, pool rows))
EPOCH_KEYS = ("router_entropy_norm", "router_max_prob", "gate_gap")


class TrainingDiagnostics:
    """Collects the figures above for one training run of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, index: HistoryIndex, train: pa.Table, probe_samples: int, seed: int) -> None:
        self.model = model
        self.index = index
        self.train = train
        self.grads = GradientCounter(model)
        rng = np.random.default_rng([seed, 20_260_119])  # not the training generator
        n = min(probe_samples, train.num_rows)
        self.probe_set = train.take(np.sort(rng.choice(train.num_rows, n, replace=False)))
        self.last_grads: dict[str, Any] | None = None

    @classmethod
    def of(cls, model: nn.Module, index: HistoryIndex, train: pa.Table, probe_samples: int, seed: int
           ) -> TrainingDiagnostics | None:
        """Diagnostics for ``model``, or None when it has no shared K/V branch (a full-KV model)."""
        return cls(model, index, train, probe_samples, seed) if shared_branches(model) else None

    def after_backward(self) -> None:
        self.grads.after_backward()

    def epoch_end(self) -> dict[str, float]:
        """The epoch's figures (keys of a history row); reads and resets the gradient counts."""
        self.last_grads = self.grads.take()
        probe = self.routing(self.probe_set)
        return {**{k: probe[k] for k in EPOCH_KEYS}, "probe_rows_used": probe["rows_used"],
                "grad_rows": self.last_grads["grad_rows"]}  # fmt: skip

    def final(self) -> dict[str, Any]:
        """The end-of-training figures over every training sample (call with the final weights)."""
        return {"train_samples": self.train.num_rows, **self.routing(self.train), "grad_last_epoch": self.last_grads}

    @torch.no_grad()
    def routing(self, samples: pa.Table) -> dict[str, Any]:
        """:meth:`model.diagnostics.RoutingProbe.summary` over the histories of ``samples``."""
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        users = samples.column("user_id").to_numpy()
        hist_lens = samples.column("hist_len").to_numpy()
        with RoutingProbe(model) as probe:
            for lo in range(0, len(users), PROBE_BATCH):
                w = self.index.window(users[lo : lo + PROBE_BATCH], hist_lens[lo : lo + PROBE_BATCH],
                                      model.cfg.window_len)  # type: ignore[union-attr]
                model.prefill(torch.from_numpy(w.items).to(device), torch.from_numpy(w.feedback).to(device),
                              torch.from_numpy(w.lengths).to(device))  # type: ignore[operator]
        model.train(was_training)
        return probe.summary()
