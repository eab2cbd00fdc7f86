"""The token-table alternative (pipeline/reports/token_table.py): sizes from model.cache_spec, the choice
within a GPU budget, and the models it does not apply to."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from collectivekv.jobs.capacity import capacity
from collectivekv.model.cache_spec import token_id_itemsize, token_only_reason, token_row_bytes, token_vocabulary
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.reports.token_table import pool_bytes, token_lines, token_table

DIN = ModelConfig(n_items=9_066, d_attn=256, n_heads=8, max_len=50,
                  collective=CollectiveConfig(d_user=1, pool_size=1_000))


def test_token_facts_come_from_the_cache_spec() -> None:
    assert token_only_reason(DIN) is None
    for arch in ("sim", "eta", "sdim", "twin"):
        assert token_only_reason(ModelConfig(n_items=10, arch=arch, n_genres=3)) is None
    assert "contextual" in token_only_reason(ModelConfig(n_items=10, arch="hstu"))
    assert token_vocabulary(DIN) == 2 * 9_066
    assert (token_id_itemsize(65_536), token_id_itemsize(65_537)) == (2, 4)
    assert token_row_bytes(DIN, "full", 2) == 2 * 256 * 2  # one K and one V row at fp16
    assert token_row_bytes(DIN, "collective", 2) == 2 * 1 * 2 + 2 * 2  # user parts + two uint16 indices
    assert pool_bytes(DIN) == 2 * 1_000 * 255 * 4


def test_the_choice_follows_the_gpu_budget() -> None:
    users, behaviours = 1_000, 30_000
    t = token_table(DIN, users=users, behaviours=behaviours, full_fp32_bytes=behaviours * 2 * 256 * 4,
                    collective_store_bytes=behaviours * 8)
    assert t["applies"] and t["vocabulary"] == 18_132 and t["token_id_bytes"] == 2
    assert t["store_payload_bytes"] == 2 * behaviours and t["per_user_bytes"] == 60.0
    assert t["cr"] == pytest.approx(2 / 2048) and t["vs_collective_store"] == pytest.approx(0.25)
    assert t["gpu_table_bytes"]["full"] == 18_132 * 1024
    assert t["choice"].startswith("token ids + full-KV token table")
    full = t["gpu_table_bytes"]["full"]
    mid = token_table(DIN, users=users, behaviours=behaviours, gpu_budget_bytes=full - 1)
    assert mid["choice"].startswith("token ids + CollectiveKV token table")
    none = token_table(DIN, users=users, behaviours=behaviours, gpu_budget_bytes=1_000)
    assert none["choice"].startswith("CollectiveKV per-user store")
    assert any("CR 0.098%" in line for line in token_lines(t))
    hstu = token_table(ModelConfig(n_items=10, arch="hstu"), users=1, behaviours=1)
    assert hstu == {"applies": False, "reason": hstu["reason"]} and "does not apply" in token_lines(hstu)[0]


def test_per_event_features_multiply_the_vocabulary() -> None:
    """A store of a model with gap and hour features (16 × 24 event codes): the token table still applies, to
    items × 2 × 384 tokens, by hand."""
    cfg = ModelConfig(n_items=9_066, d_attn=256, n_heads=8, max_len=50, event_features=("gap", "hour"),
                      collective=CollectiveConfig(d_user=1, pool_size=1_000))
    behaviours = 30_000
    t = token_table(cfg, users=1_000, behaviours=behaviours, full_fp32_bytes=behaviours * 2 * 256 * 4,
                    collective_store_bytes=behaviours * 8)
    vocab = 9_066 * 2 * 16 * 24
    assert t["applies"] and t["vocabulary"] == vocab == 6_962_688 and t["event_codes"] == 384
    assert t["token_id_bytes"] == 4 and t["store_payload_bytes"] == 4 * behaviours  # ids no longer fit uint16
    assert t["gpu_table_bytes"]["full"] == vocab * 1024
    assert t["gpu_table_bytes"]["collective"] == vocab * 8 + 2 * 1_000 * 255 * 4
    assert "one of 384 per-event codes; 6,962,688 tokens" in token_lines(t)[0]


def test_ckv_capacity_sizes_the_alternative_for_a_vocabulary(tmp_path) -> None:  # noqa: ANN001
    args = ["--users", "300000000", "--results-dir", str(tmp_path)]
    big = CliRunner().invoke(capacity, [*args, "--items", "100000000", "--json"])
    assert big.exit_code == 0, big.output
    t = json.loads(big.output)["token_table"]
    assert t["token_id_bytes"] == 4 and t["gpu_table_bytes"]["full"] == 2 * 100_000_000 * 1024
    assert t["choice"].startswith("token ids + CollectiveKV token table")  # 190.7 GiB > the 80 GiB budget
    small = CliRunner().invoke(capacity, [*args, "--items", "5000000"])
    assert "token ids + full-KV token table" in small.output
    assert "token-table" not in CliRunner().invoke(capacity, args).output
