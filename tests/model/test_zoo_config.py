"""Zoo model configs: ``--d-user auto`` recovers the rank of the unshareable part of synthetic low-rank K/V;
pre-zoo config dicts load and round-trip unchanged; the compression rate counts every cached group; configs that
would fail later (SDIM codes too wide to cache, bad head / genre / dropout values) are refused at once, and so are
feedback ids outside the vocabulary, which would alias another item's token."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from collectivekv.model.cache_spec import compression_rate, entry_bytes
from collectivekv.model.config import ZOO_DEFAULTS, ModelConfig, config_from_dict, config_to_dict
from collectivekv.model.d_user import choose_d_user
from collectivekv.model.zoo import MODELS, PAPER_MODELS
from tests.model.zoo_helpers import make_batch, make_model, zoo_config


def low_rank_kv(rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K rows = one of 12 shared cluster centres (what a pool can share) + a rank-``rank`` per-row term
    (what it cannot) + small noise; 40 users × 100 behaviours, d = 32."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, 32, generator=g) * 20
    basis = torch.randn(rank, 32, generator=g)
    rows, users = [], []
    for u in range(40):
        z = torch.randint(0, 12, (100,), generator=g)
        rows.append(centres[z] + torch.randn(100, rank, generator=g) @ basis + 0.05 * torch.randn(100, 32, generator=g))
        users.append(torch.full((100,), u))
    return torch.cat(rows), torch.cat(users)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_d_user_auto_recovers_rank_of_unshareable_part(rank: int) -> None:
    rows, users = low_rank_kv(rank)
    choice = choose_d_user(rows, users, pool_size=12, eps=1e-3)
    assert choice.d_user == rank and choice.codes == 12
    assert choice.unexplained[rank] <= choice.eps < choice.unexplained[rank - 1]
    # the per-row term holds ~0.5% of the energy per direction: the default eps (5%) leaves it out
    assert choose_d_user(rows, users, pool_size=12).d_user == 1
    # a pool with a row per behaviour quantises part of the per-row term too
    assert choose_d_user(rows, users, pool_size=100_000, eps=1e-3).d_user <= rank
    assert choose_d_user(rows, users, pool_size=12, eps=1e-3, d_max=2).d_user == min(rank, 2)


# ------------------------------------------------------------------------------------ configs and CR
def test_old_config_dicts_load_and_round_trip_unchanged() -> None:
    old = config_to_dict(ModelConfig(n_items=5))
    assert not set(ZOO_DEFAULTS) & set(old)  # pre-zoo dicts (and model versions) are unchanged
    assert config_from_dict(old).arch == "din"
    cfg = zoo_config("eta", kv_mode="full")
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["arch"] == "eta" and config_from_dict(d) == cfg
    with pytest.raises(ValueError, match="arch"):
        zoo_config("bert")
    with pytest.raises(ValueError, match="long_len"):
        zoo_config("sim", max_len=11)
    assert set(MODELS) == {"din", *PAPER_MODELS}


def test_compression_rate_counts_every_cached_group() -> None:
    din = ModelConfig(n_items=5)
    # per behaviour: two 1-dim user parts at fp16 + two uint16 indices, over fp32 K and V of d_a 256
    assert compression_rate(din) == (2 * 1 * 2 + 2 * 2) / (2 * din.d_attn * 4)
    sim = ModelConfig(n_items=5, n_genres=19, arch="sim")  # d_u 1, pool 10k, d_a 256, 50 + 1000 behaviours
    # short 50 × 8 B + long 1000 × (8 B + 3 B genre bitmask) over (50 + 1000) × 2 × 256 × 4 B
    assert entry_bytes(sim) == 50 * 8 + 1000 * 11
    assert compression_rate(sim) == pytest.approx(11_400 / 2_150_400)
    sdim = dataclasses.replace(sim, arch="sdim")  # long group caches V only (full: 1 × 256 × 4 B)
    assert compression_rate(sdim) == pytest.approx((50 * 8 + 1000 * (2 + 2 + 2)) / (50 * 2048 + 1000 * 1024))
    hstu = ModelConfig(n_items=5, arch="hstu", max_len=200)
    assert compression_rate(hstu) == pytest.approx(8 / 2048)
    assert compression_rate(dataclasses.replace(hstu, kv_mode="full")) == 1.0


def test_sdim_codes_that_cannot_be_cached_are_refused_at_config_time() -> None:
    """A behaviour's bucket codes are cached in one 63-bit key: 8 hashes x 8 bits would fail only at prefill."""
    with pytest.raises(ValueError, match="sdim_hashes x sdim_bits must be <= 63"):
        zoo_config("sdim", sdim_hashes=8, sdim_bits=8)
    assert zoo_config("sdim", sdim_hashes=9, sdim_bits=7).sdim_hashes == 9
    assert zoo_config("sim", sdim_hashes=8, sdim_bits=8).arch == "sim"  # other models do not cache bucket codes


@pytest.mark.parametrize(("arch", "change", "message"), [
    ("din", {"n_heads": 0}, "n_heads must be >= 1"), ("din", {"n_heads": -4}, "n_heads must be >= 1"),
    ("din", {"max_genres": 0}, "max_genres must be >= 1"), ("din", {"n_genres": -1}, "n_genres must be >= 0"),
    ("sim", {"n_genres": 63}, "at most 62 categories"), ("din", {"dropout": 1.5}, r"dropout must be in \[0, 1\)")])
def test_configs_that_would_fail_later_are_refused_at_once(arch: str, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        zoo_config(arch, **change)


@pytest.mark.parametrize("arch", ["din", "sim", "hstu"])
@pytest.mark.parametrize("bad", [3, -1])
def test_a_feedback_id_outside_the_vocabulary_is_refused_not_aliased(arch: str, bad: int) -> None:
    """token = item · n_feedback + feedback: feedback 3 of item 7 was item 8's feedback 0 (same score, no error)."""
    cfg = zoo_config(arch)
    model = make_model(cfg, seed=0).eval()
    items, feedback, lengths, targets = make_batch([4, 3], cfg.window_len, 0)
    feedback[0, 1] = bad
    with pytest.raises(ValueError, match=rf"feedback ids must lie in \[0, {cfg.n_feedback}\) .*; got {bad}"):
        model(items, feedback, lengths, targets)
    feedback[0, 1] = 1
    model(items, feedback, lengths, targets)  # in range: scored
