"""What ``ckv eval`` trains and reports: its settings, the labelled rows of every section, and the
report being assembled (shared by :mod:`pipeline.training.zoo_eval`, which runs the plan, and
:mod:`pipeline.training.zoo_eval_report`, which writes it up).

A row is one model config trained with every seed; ``cfg`` None marks a collective row whose d_u is
the per-seed ``--d-user auto`` choice of ``arch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from collectivekv.model.config import CollectiveConfig, ModelConfig, with_sharing
from collectivekv.model.zoo import PAPER_MODELS
from collectivekv.pipeline.training.trainer import TrainConfig

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
            c = replace(cfg.collective, **collective)
            cfg = replace(with_sharing(cfg, c.share_k, c.share_v), kv_mode=cfg.kv_mode, collective=c)
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
    users: dict[str, Any] = field(default_factory=dict)  # run id → per-user test GAUC parts (UserAUC)
    data: dict[str, Any] = field(default_factory=dict)  # the dataset's split and test-set sizes
