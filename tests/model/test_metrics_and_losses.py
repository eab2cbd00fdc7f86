"""Metrics against brute force (ties included) and router losses against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.model.metrics import auc, gauc, logloss
from collectivekv.model.routing import balance_loss, gather_pool, peak_loss, route


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


scores_st = st.lists(st.integers(0, 4), min_size=1, max_size=40)  # few values → many ties


@given(scores_st, st.data())
@settings(max_examples=200, deadline=None)
def test_auc_matches_brute_force_with_ties(raw: list[int], data: st.DataObject) -> None:
    y = np.array(data.draw(st.lists(st.integers(0, 1), min_size=len(raw), max_size=len(raw))))
    s = np.array(raw, dtype=float) / 4
    got, want = auc(y, s), brute_auc(y, s)
    assert (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, abs_tol=1e-12)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=60))
@settings(max_examples=150, deadline=None)
def test_gauc_matches_brute_force(rows: list[tuple[int, int, int]]) -> None:
    u = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    s = np.array([r[2] for r in rows], dtype=float)
    num = den = 0.0
    for user in set(u.tolist()):
        m = u == user
        a = brute_auc(y[m], s[m])
        if not math.isnan(a):
            num += m.sum() * a
            den += m.sum()
    want = num / den if den else float("nan")
    got = gauc(u, y, s)
    assert (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, abs_tol=1e-12)


def test_auc_known_values() -> None:
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_logloss_hand_computed() -> None:
    got = logloss(np.array([1, 0]), np.array([0.8, 0.4]))
    assert math.isclose(got, -(math.log(0.8) + math.log(0.6)) / 2, rel_tol=1e-12)


def test_peak_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]], dtype=torch.float64)
    r = route(logits)
    assert r.idx.tolist() == [1, 0]
    # sigmoid(ln 3) = 0.75, sigmoid(2) = 1 / (1 + e^-2)
    want = (-math.log(0.75) - math.log(1 / (1 + math.exp(-2.0)))) / 2
    assert math.isclose(peak_loss(r.top_logit).item(), want, rel_tol=1e-12)
    # count weights: row 0 twice, row 1 once
    want_w = (2 * -math.log(0.75) - math.log(1 / (1 + math.exp(-2.0)))) / 3
    got_w = peak_loss(r.top_logit, torch.tensor([2, 1])).item()
    assert math.isclose(got_w, want_w, rel_tol=1e-12)


def test_balance_loss_hand_computed() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    # softmax rows: [0.75, 0.25], [0.5, 0.5]; mean [0.625, 0.375]; KL to uniform(2)
    want = 0.625 * math.log(0.625 * 2) + 0.375 * math.log(0.375 * 2)
    assert math.isclose(balance_loss(logits).item(), want, rel_tol=1e-12)
    assert balance_loss(torch.zeros(5, 7, dtype=torch.float64)).item() == 0.0
    # weights == repeating rows
    w = balance_loss(logits, torch.tensor([3, 1])).item()
    rep = balance_loss(logits[[0, 0, 0, 1]]).item()
    assert math.isclose(w, rep, rel_tol=1e-12)


def test_losses_of_empty_batch_are_zero() -> None:
    empty = torch.zeros(0, 4)
    assert peak_loss(empty.max(-1).values).item() == 0.0
    assert balance_loss(empty).item() == 0.0


def test_gather_pool_soft_equals_hard_at_gate_one() -> None:
    pool = torch.randn(10, 3)
    idx = torch.tensor([[1, 9], [0, 0]])
    assert torch.equal(gather_pool(pool, idx, torch.ones(2, 2)), gather_pool(pool, idx))


def test_fused_router_matches_reference_values_and_gradients() -> None:
    from collectivekv.model.routing import fused_route

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)
    counts = torch.randint(1, 4, (9,), generator=g)
    up_top = torch.randn(9, dtype=torch.float64, generator=g)

    def objective(routing_top: torch.Tensor, balance: torch.Tensor) -> torch.Tensor:
        return (routing_top * up_top).sum() + 0.7 * balance

    routing, bal = fused_route(x, w, counts)
    objective(routing.top_logit, bal).backward()
    got = (routing.idx.clone(), routing.top_logit.detach(), bal.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    logits = x @ w.t()
    ref = route(logits)
    ref_bal = balance_loss(logits, counts)
    objective(ref.top_logit, ref_bal).backward()
    assert torch.equal(got[0], ref.idx)
    torch.testing.assert_close(got[1], ref.top_logit.detach())
    torch.testing.assert_close(got[2], ref_bal.detach())
    torch.testing.assert_close(got[3], x.grad)
    torch.testing.assert_close(got[4], w.grad)


def test_nan_scores_and_mismatched_lengths_are_refused_not_ranked() -> None:
    """A NaN has no rank (an AUC over it depended on the input order: all-NaN scores gave 1.0)."""
    from collectivekv.model.metrics import auc, gauc

    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="4 of 4 scores are NaN"):
        auc(y, np.full(4, np.nan))
    with pytest.raises(ValueError, match="scores are NaN"):
        gauc(np.ones(4, np.int64), y, np.array([0.1, np.nan, 0.2, 0.3]))
    with pytest.raises(ValueError, match="differ in shape"):
        gauc(np.ones(3, np.int64), y, np.full(4, 0.5))
