"""HSTU's cache: cached decode == the matching slice of a full forward pass, which itself matches an independent
per-head reference; ``append`` == prefill of the longer history; a training step's router gradients are finite."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.model.hstu import HSTU, rel_bucket
from tests.model.zoo_helpers import VARIANTS, make_batch, make_model, paper_kv, valid_of, zoo_config


def hstu_reference(m: HSTU, items: torch.Tensor, feedback: torch.Tensor, lengths: torch.Tensor):  # noqa: ANN201
    """Plain per-layer HSTU over whole sequences (explicit causal mask): outputs (B, L, E) and each
    layer's (K, V); only valid positions are meaningful."""
    b, seq = items.shape
    valid = valid_of(lengths, seq)
    x = (m.item_embedding(items) + m.feedback_emb(feedback)) * valid.unsqueeze(-1)
    i = torch.arange(seq)
    causal = (i.unsqueeze(1) >= i.unsqueeze(0)) & valid.unsqueeze(1) & valid.unsqueeze(2)  # (B, L, L)
    bucket = rel_bucket((i.unsqueeze(1) - i.unsqueeze(0)).clamp(min=0))  # (L, L)
    kvs = []
    for layer in m.layers:
        h = layer.norm_in(x)
        u, q = torch.nn.functional.silu(layer.uq(h)).chunk(2, -1)
        k, v = paper_kv(layer.k_branch, h, silu_full=True), paper_kv(layer.v_branch, h, silu_full=True)
        kvs.append((k, v))
        heads, dh = m.cfg.n_heads, m.cfg.d_attn // m.cfg.n_heads
        out = torch.zeros_like(q)
        for hd in range(heads):
            sl = slice(hd * dh, (hd + 1) * dh)
            s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh) + layer.rel_bias[hd][bucket]
            a = torch.nn.functional.silu(s) * causal / m.cfg.max_len
            out[..., sl] = a @ v[..., sl]
        x = x + layer.out(layer.norm_out(out) * u)
    return x, kvs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@given(data=st.data(), seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=8, deadline=None)
def test_hstu_cached_decode_equals_slice_of_full_forward(
    variant: str, data: st.DataObject, seed: int, dtype: torch.dtype
) -> None:
    cfg = zoo_config("hstu", **VARIANTS[variant])
    m = make_model(cfg, seed=seed % 7, dtype=dtype).eval()
    width = data.draw(st.integers(1, cfg.max_len - 1))
    lengths = data.draw(st.lists(st.sampled_from([0, 1, *range(width + 1)]), min_size=1, max_size=4))
    items, feedback, lens, targets = make_batch(lengths, width, seed)
    b = len(lengths)
    rows = torch.arange(b)
    # the full sequence: history, then the candidate at position lengths[b] (feedback 0 = unknown)
    ext_items = torch.cat([items, torch.zeros(b, 1, dtype=torch.long)], 1)
    ext_items[rows, lens] = targets
    ext_feedback = torch.cat([feedback, torch.zeros(b, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        hidden, layer_kv = m.sequence_forward(ext_items, ext_feedback, lens + 1)
        want = m.score_hidden(hidden[rows, lens], m.item_embedding(targets))
        cache = m.prefill(items, feedback, lens)
        got = m.decode(cache, targets)
        ref_hidden, ref_kv = hstu_reference(m, ext_items, ext_feedback, lens + 1)
    torch.testing.assert_close(got, want)
    ext_valid = valid_of(lens + 1, width + 1)
    torch.testing.assert_close(hidden[ext_valid], ref_hidden[ext_valid])
    hist_valid = valid_of(lens, cache.kv["layer0"].k_user.shape[1])
    for (k_c, v_c), (k_f, v_f), (k_r, v_r) in zip(m.keys_values(cache).values(), layer_kv, ref_kv, strict=True):
        full_valid = valid_of(lens, width + 1)
        torch.testing.assert_close(k_c[hist_valid], k_f[full_valid])
        torch.testing.assert_close(v_c[hist_valid], v_f[full_valid])
        torch.testing.assert_close(k_f[ext_valid], k_r[ext_valid])
        torch.testing.assert_close(v_f[ext_valid], v_r[ext_valid])


@pytest.mark.parametrize("variant", ["full", "collective"])
def test_hstu_append_equals_prefill_of_longer_history(variant: str) -> None:
    cfg = zoo_config("hstu", **VARIANTS[variant])
    m = make_model(cfg, seed=2, dtype=torch.float64).eval()
    items, feedback, lens, targets = make_batch([9, 5, 1, 0, 7], 9, seed=4)
    prefix = torch.tensor([4, 0, 1, 0, 7])  # behaviours already cached; the rest arrive later
    b = len(lens)
    new_len = lens - prefix
    pos = prefix.unsqueeze(1) + torch.arange(9)
    keep = torch.arange(9).unsqueeze(0) < new_len.unsqueeze(1)
    new_items = torch.where(keep, items.gather(1, pos.clamp(max=8)), 0)
    new_feedback = torch.where(keep, feedback.gather(1, pos.clamp(max=8)), 0)
    p_items, p_feedback, _, _ = make_batch([0] * b, 9, seed=0)
    p_keep = torch.arange(9).unsqueeze(0) < prefix.unsqueeze(1)
    p_items, p_feedback = torch.where(p_keep, items, p_items), torch.where(p_keep, feedback, p_feedback)
    with torch.no_grad():
        grown = m.append(m.prefill(p_items, p_feedback, prefix), new_items, new_feedback, new_len)
        whole = m.prefill(items, feedback, lens)
        assert torch.equal(grown.lengths, whole.lengths)
        valid = valid_of(lens, whole.kv["layer0"].k_user.shape[1])
        for (k_g, v_g), (k_w, v_w) in zip(m.keys_values(grown).values(), m.keys_values(whole).values(), strict=True):
            torch.testing.assert_close(k_g[:, : valid.shape[1]][valid], k_w[valid])
            torch.testing.assert_close(v_g[:, : valid.shape[1]][valid], v_w[valid])
        torch.testing.assert_close(m.decode(grown, targets), m.decode(whole, targets))


def test_hstu_training_step_has_finite_router_gradients() -> None:
    m = make_model(zoo_config("hstu"), seed=1).train()
    items, feedback, lens, targets = make_batch([10, 3, 0], 10, seed=1)
    logits, losses = m(items, feedback, lens, targets)
    m.loss(logits, torch.tensor([1.0, 0.0, 1.0]), losses).backward()
    assert losses.balance > 0 and losses.peak > 0
    for layer in m.layers:
        assert layer.k_branch.router.weight.grad is not None and torch.isfinite(layer.k_branch.pool.grad).all()
