"""The long-sequence stages' retrieval on hand-built examples: SIM's category search over genre bitmasks,
SimHash codes and Hamming top-k (ETA), SDIM's bucket aggregation, and TWIN's top-k attention (== dense attention
at k = L, == argmax at k = 1, ties broken by recency whatever the padding)."""

from __future__ import annotations

import math

import torch

from collectivekv.model.attention import target_attention_reference
from collectivekv.model.retrieval import (
    bitmask,
    category_topk,
    hamming_topk,
    sdim_aggregate,
    simhash,
    topk_target_attention,
)
from collectivekv.model.zoo import create_model
from tests.model.zoo_helpers import N_ITEMS, zoo_config


# ----------------------------------------------------------------------------------------- retrieval
def test_category_search_picks_expected_topk() -> None:
    a, b_, c = 1, 2, 4  # category bits
    cats = torch.tensor([[a, b_, a | b_, c, a, a]])  # last position is padding (length 5)
    lens = torch.tensor([5])
    idx, n_sel = category_topk(cats, torch.tensor([[a, a | b_, 8]]), lens, topk=3, n_bits=4)
    assert idx[0, 0, : n_sel[0, 0]].tolist() == [4, 2, 0]  # all share one category: most recent first
    assert idx[0, 1, : n_sel[0, 1]].tolist() == [2, 4, 1]  # two shared categories first, then recency
    assert n_sel[0, 2] == 0  # nothing shares category 8
    assert bitmask(torch.tensor([[1, 3, 0], [0, 0, 0]])).tolist() == [0b101, 0]


def test_sim_uses_genre_sets_as_categories() -> None:
    cfg = zoo_config("sim", topk=2)
    genres = torch.zeros(N_ITEMS + 1, 3, dtype=torch.long)
    genres[1], genres[2], genres[3] = torch.tensor([1, 2, 0]), torch.tensor([3, 0, 0]), torch.tensor([2, 3, 0])
    m = create_model(cfg, genres).eval()
    items = torch.tensor([[1, 2, 3, 2, 0]])
    cache = m.prefill(items, (items > 0).long() * 2, torch.tensor([4]))
    assert cache.keys["categories"].tolist() == [[0b011, 0b100, 0b110, 0b100]]
    idx, n_sel = m.retrieve(cache, torch.tensor([[3]]))  # genres {2, 3}: position 2 shares both
    assert idx[0, 0, : n_sel[0, 0]].tolist() == [2, 3]


def test_simhash_and_hamming_topk_on_hand_built_codes() -> None:
    planes = torch.eye(3)
    assert simhash(torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, -1.0]]), planes).tolist() == [0b101, 0]
    codes = torch.tensor([[0b0000, 0b1111, 0b0001, 0b0011, 0b0001, 0b0001]])  # last: padding
    idx, n_sel = hamming_topk(codes, torch.tensor([[0b0001]]), torch.tensor([5]), topk=3, n_bits=4)
    assert idx[0, 0].tolist() == [4, 2, 3] and n_sel.tolist() == [[3]]  # distance 0, 0, 1; recency breaks ties
    idx, n_sel = hamming_topk(codes, torch.tensor([[0b0001]]), torch.tensor([2]), topk=3, n_bits=4)
    assert idx[0, 0, :2].tolist() == [0, 1] and n_sel.tolist() == [[2]]


def test_sdim_aggregates_colliding_values() -> None:
    v = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
    buckets = torch.tensor([[[1, 0], [2, 0], [1, 1], [1, 1]]])  # last position is padding
    out = sdim_aggregate(v, buckets, torch.tensor([[[1, 1]]]), torch.tensor([3]))
    h0 = torch.tensor([3.0, 8.0]) / math.hypot(3, 8)  # hash 0: positions 0 and 2 collide
    h1 = torch.tensor([0.0, 1.0])  # hash 1: position 2 only
    torch.testing.assert_close(out[0, 0], (h0 + h1) / 2)


def test_topk_attention_reduces_to_dense_and_to_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 8, generator=g), torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    lens = torch.tensor([6, 2, 0])
    dense = target_attention_reference(q, k, v, lens, 2)
    torch.testing.assert_close(topk_target_attention(q, k, v, lens, 2, topk=6), dense)
    one = topk_target_attention(q, k, v, lens, 2, topk=1)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        best = (q[0, :, sl] @ k[0, :, sl].T).argmax(-1)  # (C,)
        torch.testing.assert_close(one[0, :, sl], v[0, best, sl])
    assert torch.all(one[2] == 0)


def test_topk_attention_breaks_ties_by_recency_whatever_the_padding() -> None:
    """Equal scores (behaviours routed to one pool row tie exactly in heads without user dims): the
    most recent behaviour wins, and padding the batch wider changes nothing."""
    k = torch.ones(1, 5, 4)  # every behaviour has the same key: all scores tie
    v = torch.arange(20, dtype=torch.float32).reshape(1, 5, 4)  # distinct values
    q = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([4])  # position 4 is padding
    got = topk_target_attention(q, k, v, lens, 1, topk=2)
    torch.testing.assert_close(got, v[:, 2:4].mean(1, keepdim=True).expand(1, 2, 4))  # positions 3 and 2
    wide_k, wide_v = torch.cat([k, torch.zeros(1, 7, 4)], 1), torch.cat([v, torch.zeros(1, 7, 4)], 1)
    assert torch.equal(topk_target_attention(q, wide_k, wide_v, lens, 1, topk=2), got)
