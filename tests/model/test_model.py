"""Parity tests of the target-attention CTR model: prefill/decode split, cache rebuild, soft vs
hard routing, distinct-token routing vs the per-behaviour reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collectivekv.model.ctr as ctr_module
from collectivekv.model.config import CollectiveConfig, ModelConfig, config_from_dict, config_to_dict
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.routing import balance_loss, peak_loss
from tests.helpers import padded_batch

N_ITEMS = 40


def small_config(**kw: object) -> ModelConfig:
    base = ModelConfig(
        n_items=N_ITEMS, n_genres=5, max_genres=3, embed_dim=16, d_attn=32, n_heads=4, max_len=8,
        mlp_dims=(16,), collective=CollectiveConfig(d_user=2, pool_size=12),
    )  # fmt: skip
    return dataclasses.replace(base, **kw)


def make_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> TargetAttentionCTR:
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(0, cfg.n_genres + 1, (cfg.n_items + 1, cfg.max_genres), generator=g)
    genres[0] = 0
    torch.manual_seed(seed)
    return TargetAttentionCTR(cfg, genres).to(dtype)


def make_batch(b: int, seq: int, seed: int, min_len: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, seq + 1, (b,), generator=g)
    return padded_batch(lengths, seq, g, N_ITEMS)


VARIANTS = {
    "full": dict(kv_mode="full"),
    "collective": dict(kv_mode="collective"),
    "share_k_only": dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_v=False)),
    "share_v_only": dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_k=False)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@given(b=st.integers(1, 5), seq=st.integers(1, 8), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.float64]))  # fmt: skip
@settings(max_examples=15, deadline=None)
def test_decode_of_prefill_equals_forward(
    variant: str, b: int, seq: int, seed: int, dtype: torch.dtype
) -> None:
    cfg = small_config(**VARIANTS[variant])
    m = make_model(cfg, dtype=dtype).eval()
    items, feedback, lengths, targets = make_batch(b, seq, seed)
    with torch.no_grad():
        full, _ = m(items, feedback, lengths, targets)
        cache = m.prefill(items, feedback, lengths)
        split = m.decode(cache, targets)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(split, full, rtol=0, atol=0)
    assert cache.k_user.shape == (b, seq, cfg.dk_user)
    assert cache.v_user.shape == (b, seq, cfg.dv_user)
    assert (cache.k_idx is None) == (not cfg.k_shared)
    assert (cache.v_idx is None) == (not cfg.v_shared)


def reference_kv(m: TargetAttentionCTR, items: torch.Tensor, feedback: torch.Tensor,
                 lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """K, V per behaviour straight from the paper's equations (no dedup, no cache)."""
    x = m.item_embedding(items) + m.feedback_emb(feedback)  # (B, L, E)
    valid = torch.arange(items.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)

    def one(branch: ctr_module.KVBranch) -> torch.Tensor:
        if not branch.shared:
            return branch.proj(x * valid.unsqueeze(-1))
        user = torch.nn.functional.silu(branch.proj(x))
        idx = branch.router(x).argmax(-1)  # (B, L)
        kv = torch.cat([user, branch.pool[idx]], dim=-1)
        return kv

    return one(m.k_branch), one(m.v_branch)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rebuilt_kv_equals_kv_inside_forward_and_reference(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_config(**VARIANTS[variant])
    m = make_model(cfg, seed=3).eval()
    items, feedback, lengths, targets = make_batch(6, 8, seed=7, min_len=1)
    seen: dict[str, torch.Tensor] = {}
    real = ctr_module.target_attention

    def spy(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, n_heads: int
    ) -> torch.Tensor:
        seen["k"], seen["v"] = k, v
        return real(q, k, v, lengths, n_heads)

    monkeypatch.setattr(ctr_module, "target_attention", spy)
    with torch.no_grad():
        m(items, feedback, lengths, targets)
        k_rebuilt, v_rebuilt = m.keys_values(m.prefill(items, feedback, lengths))
        k_ref, v_ref = reference_kv(m, items, feedback, lengths)
    valid = torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)
    torch.testing.assert_close(k_rebuilt, seen["k"], rtol=0, atol=0)
    torch.testing.assert_close(v_rebuilt, seen["v"], rtol=0, atol=0)
    torch.testing.assert_close(k_rebuilt[valid], k_ref[valid])
    torch.testing.assert_close(v_rebuilt[valid], v_ref[valid])


def test_soft_path_equals_hard_path_when_winning_sigmoid_is_one() -> None:
    m = make_model(small_config(), seed=1)
    with torch.no_grad():  # make every winning logit huge: sigmoid == 1.0 exactly in float32
        for branch in (m.k_branch, m.v_branch):
            branch.router.weight.mul_(1e4)
    items, feedback, lengths, targets = make_batch(5, 8, seed=2, min_len=1)
    m.train()
    soft, losses = m(items, feedback, lengths, targets)
    cache = m.prefill(items, feedback, lengths)
    assert cache.k_gate is not None and torch.all(cache.k_gate[cache.k_gate > 0] == 1.0)
    m.eval()
    hard, _ = m(items, feedback, lengths, targets)
    torch.testing.assert_close(soft, hard, rtol=0, atol=0)
    assert losses.peak.item() == pytest.approx(0.0, abs=1e-6)


def test_soft_path_scales_collective_part_and_trains_router() -> None:
    m = make_model(small_config(), seed=4).train()
    items, feedback, lengths, targets = make_batch(4, 8, seed=5, min_len=2)
    logits, losses = m(items, feedback, lengths, targets)
    m.loss(logits, torch.ones_like(logits), losses).backward()
    for branch in (m.k_branch, m.v_branch):
        assert branch.router.weight.grad is not None and branch.router.weight.grad.abs().sum() > 0
        assert branch.pool.grad is not None and torch.isfinite(branch.pool.grad).all()
    cache = m.prefill(items, feedback, lengths)
    assert cache.k_gate is not None and torch.all(
        (cache.k_gate > 0) & (cache.k_gate < 1) | (cache.k_gate == 0)
    )


def test_distinct_token_losses_equal_per_behaviour_losses() -> None:
    m = make_model(small_config(), seed=6).train()
    items, feedback, lengths, _ = make_batch(7, 8, seed=9)
    items[:, :3] = items[0, 0]  # force repeated tokens
    feedback[:, :3] = feedback[0, 0]
    lengths.clamp_(min=3)
    _, losses = m.prefill_with_losses(items, feedback, lengths)
    x = m.item_embedding(items) + m.feedback_emb(feedback)
    valid = torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)
    peak = balance = 0.0
    for branch in (m.k_branch, m.v_branch):
        logits = branch.router(x[valid])  # (N, M)
        peak = peak + peak_loss(logits.max(-1).values)
        balance = balance + balance_loss(logits)
    torch.testing.assert_close(losses.peak, peak)
    torch.testing.assert_close(losses.balance, balance)


def test_empty_histories_give_finite_scores_and_gradients() -> None:
    m = make_model(small_config(), seed=8).train()
    items = torch.zeros(3, 8, dtype=torch.long)
    logits, losses = m(items, items.clone(), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3]))
    loss = m.loss(logits, torch.tensor([1.0, 0.0, 1.0]), losses)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_multi_candidate_decode_equals_single_candidate_decode() -> None:
    m = make_model(small_config(), seed=10).eval()
    items, feedback, lengths, _ = make_batch(4, 8, seed=11)
    cands = torch.randint(1, N_ITEMS + 1, (4, 3))
    with torch.no_grad():
        cache = m.prefill(items, feedback, lengths)
        multi = m.decode(cache, cands)
        singles = torch.stack([m.decode(cache, cands[:, c]) for c in range(3)], dim=1)
    torch.testing.assert_close(multi, singles)


def test_config_round_trip_and_validation() -> None:
    cfg = small_config(kv_mode="full")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="divisible"):
        small_config(n_heads=5)
    with pytest.raises(ValueError, match="d_user"):
        small_config(collective=CollectiveConfig(d_user=32))


@given(b=st.integers(1, 4), c=st.integers(1, 3), seq=st.integers(1, 9), heads=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 1000), dtype=st.sampled_from([torch.float32, torch.float64]))  # fmt: skip
@settings(max_examples=40, deadline=None)
def test_block_diagonal_attention_equals_reference(b: int, c: int, seq: int, heads: int, seed: int, dtype) -> None:
    from collectivekv.model.attention import target_attention, target_attention_reference

    g = torch.Generator().manual_seed(seed)
    d_a = 8 * heads
    q = torch.randn(b, c, d_a, generator=g, dtype=dtype)
    k = torch.randn(b, seq, d_a, generator=g, dtype=dtype)
    v = torch.randn(b, seq, d_a, generator=g, dtype=dtype)
    lengths = torch.randint(0, seq + 1, (b,), generator=g)
    got = target_attention(q, k, v, lengths, heads)
    want = target_attention_reference(q, k, v, lengths, heads)
    torch.testing.assert_close(got, want)
    assert torch.all(got[lengths == 0] == 0)


def test_distinct_matches_torch_unique() -> None:
    from collectivekv.model.ctr import distinct

    values = torch.tensor([5, 3, 5, 0, 9, 3, 3])
    uniq, inv, counts = distinct(values, 10)
    ru, ri, rc = torch.unique(values, return_inverse=True, return_counts=True)
    assert torch.equal(uniq, ru) and torch.equal(inv, ri) and torch.equal(counts, rc)
    with pytest.raises(ValueError, match="token ids"):
        distinct(torch.tensor([10]), 10)
    big = distinct(values * 10**7, 10**8)  # a vocabulary far larger than the values: the sort path
    assert all(torch.equal(a, b) for a, b in zip(big, (ru * 10**7, ri, rc), strict=True))
    with pytest.raises(ValueError, match="token ids"):
        distinct(torch.tensor([10**8]), 10**8)
