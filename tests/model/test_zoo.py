"""Model zoo (SIM, ETA, SDIM, TWIN, HSTU; full and CollectiveKV): prefill/decode parity, cache rebuild
vs the K/V used inside forward and vs the paper's equations, HSTU cached decode vs a full pass,
hand-built retrieval examples, ``--d-user auto`` on synthetic low-rank K/V, configs and training."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collectivekv.model.blocks as blocks_module
import collectivekv.model.longseq as longseq_module
from collectivekv.model.attention import target_attention_reference
from collectivekv.model.cache_spec import compression_rate, entry_bytes
from collectivekv.model.config import ZOO_DEFAULTS, CollectiveConfig, ModelConfig, config_from_dict, config_to_dict
from collectivekv.model.d_user import choose_d_user
from collectivekv.model.hstu import HSTU, rel_bucket
from collectivekv.model.retrieval import (
    bitmask,
    category_topk,
    gather_positions,
    hamming_topk,
    sdim_aggregate,
    simhash,
    topk_target_attention,
)
from collectivekv.model.zoo import MODELS, PAPER_MODELS, create_model
from tests.helpers import padded_batch

N_ITEMS = 40
N_GENRES = 6


def zoo_config(arch: str, **kw: object) -> ModelConfig:
    base = ModelConfig(
        n_items=N_ITEMS, n_genres=N_GENRES, max_genres=3, embed_dim=16, d_attn=32, n_heads=4, max_len=4,
        mlp_dims=(16,), collective=CollectiveConfig(d_user=2, pool_size=12), arch=arch, long_len=10, topk=3,
        hash_bits=8, sdim_hashes=3, sdim_bits=2,
    )  # fmt: skip
    if arch == "hstu":
        base = dataclasses.replace(base, max_len=10)
    return dataclasses.replace(base, **kw)


VARIANTS = {
    "full": dict(kv_mode="full"),
    "collective": dict(kv_mode="collective"),
    "share_k": dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_v=False)),
    "share_v": dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_k=False)),
}


def make_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(0, cfg.n_genres + 1, (cfg.n_items + 1, cfg.max_genres), generator=g)
    genres[0] = 0
    torch.manual_seed(seed)
    m = create_model(cfg, genres).to(dtype)
    with torch.no_grad():  # non-zero relative biases so HSTU's positions matter in the tests
        for name, p in m.named_parameters():
            if name.endswith("rel_bias"):
                p.normal_(0, 0.5)
    return m


def make_batch(lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return padded_batch(torch.tensor(lengths, dtype=torch.long), width, g, N_ITEMS)


ARCH_VARIANTS = [(a, v) for a in PAPER_MODELS for v in VARIANTS]


# --------------------------------------------------------------------------- prefill / decode parity
@pytest.mark.parametrize(("arch", "variant"), ARCH_VARIANTS)
@given(data=st.data(), width=st.integers(1, 13), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.float64]))  # fmt: skip
@settings(max_examples=6, deadline=None)
def test_decode_of_prefill_equals_forward(
    arch: str, variant: str, data: st.DataObject, width: int, seed: int, dtype: torch.dtype
) -> None:
    lengths = data.draw(st.lists(st.sampled_from([0, 1, width, *range(width + 1)]), min_size=1, max_size=4))
    cfg = zoo_config(arch, **VARIANTS[variant])
    m = make_model(cfg, dtype=dtype).eval()
    items, feedback, lens, targets = make_batch(lengths, width, seed)
    with torch.no_grad():
        full, _ = m(items, feedback, lens, targets)
        cache = m.prefill(items, feedback, lens)
        split = m.decode(cache, targets)
        multi = m.decode(cache, torch.stack([targets, targets.flip(0)], 1))
    assert full.shape == targets.shape and torch.isfinite(full).all()
    torch.testing.assert_close(split, full, rtol=0, atol=0)
    torch.testing.assert_close(multi[:, 0], full)  # a candidate's score does not depend on the others
    window = min(width, cfg.window_len)
    assert torch.equal(cache.lengths, lens.clamp(max=window))
    for name, kv in cache.kv.items():
        k_dim = cfg.dk_user if not (arch == "sdim" and name == "long") else 0
        assert kv.k_user.shape[-1] == k_dim and kv.v_user.shape[-1] == cfg.dv_user
        assert (kv.k_idx is None) == (not cfg.k_shared or k_dim == 0)
        assert (kv.v_idx is None) == (not cfg.v_shared)


# ------------------------------------------------------------------ cache rebuild vs forward / paper
def paper_kv(branch: torch.nn.Module, x: torch.Tensor, silu_full: bool = False) -> torch.Tensor:
    """K or V of every row of x straight from the paper's equations (no dedup, no cache)."""
    if not branch.shared:
        y = branch.proj(x)
        return torch.nn.functional.silu(y) if silu_full else y
    return torch.cat([torch.nn.functional.silu(branch.proj(x)), branch.pool[branch.router(x).argmax(-1)]], -1)


def valid_of(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


@pytest.mark.parametrize(("arch", "variant"), [(a, v) for a in ("sim", "eta", "sdim", "twin") for v in VARIANTS])
def test_rebuilt_kv_equals_kv_used_in_forward_and_paper(
    arch: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = zoo_config(arch, **VARIANTS[variant])
    m = make_model(cfg, seed=3).eval()
    items, feedback, lens, targets = make_batch([10, 7, 1, 0, 4, 9], 10, seed=5)
    seen: dict[str, list[tuple[torch.Tensor, ...]]] = {"ta": [], "topk": [], "sdim": []}

    def spy(name: str, real):  # noqa: ANN001, ANN202
        def f(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            seen[name].append(args)
            return real(*args, **kw)

        return f

    monkeypatch.setattr(blocks_module, "target_attention", spy("ta", blocks_module.target_attention))
    monkeypatch.setattr(blocks_module, "topk_target_attention", spy("topk", blocks_module.topk_target_attention))
    monkeypatch.setattr(longseq_module, "sdim_aggregate", spy("sdim", longseq_module.sdim_aggregate))
    with torch.no_grad():
        m(items, feedback, lens, targets)
        cache = m.prefill(items, feedback, lens)
        rebuilt = m.keys_values(cache)
        x = m.item_embedding(items) + m.feedback_emb(feedback)  # (B, L, E) behaviour tokens
    (k_s, v_s), (k_l, v_l) = rebuilt["short"], rebuilt["long"]
    # short attention: K/V of forward == rebuilt from the cache
    _, k_used, v_used, _, _ = seen["ta"][0]
    assert torch.equal(k_used, k_s) and torch.equal(v_used, v_s)
    # long stage
    if arch in ("sim", "eta"):
        idx, n_sel = m.retrieve(cache, targets.unsqueeze(1) if arch == "sim" else m.item_embedding(targets[:, None]))
        _, k_used, v_used, lens_used, _ = seen["ta"][1]
        assert torch.equal(k_used, gather_positions(k_l, idx).flatten(0, 1))
        assert torch.equal(v_used, gather_positions(v_l, idx).flatten(0, 1))
        assert torch.equal(lens_used, n_sel.reshape(-1))
    elif arch == "twin":
        _, k_used, v_used, _, _, _ = seen["topk"][0]
        assert torch.equal(k_used, k_l) and torch.equal(v_used, v_l)
    else:
        assert torch.equal(seen["sdim"][0][0], v_l) and k_l.shape[-1] == 0
    # both groups equal the paper's equations at every cached behaviour
    valid = valid_of(lens, 10)
    if m.long.k_branch is not None:
        torch.testing.assert_close(k_l[valid], paper_kv(m.long.k_branch, x[valid]))
    torch.testing.assert_close(v_l[valid], paper_kv(m.long.v_branch, x[valid]))
    short_len = lens.clamp(max=cfg.max_len)
    pos = (lens - short_len).unsqueeze(1) + torch.arange(cfg.max_len)  # last max_len positions
    x_short = x.gather(1, pos.clamp(max=9).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    sv = valid_of(short_len, cfg.max_len)
    torch.testing.assert_close(k_s[sv], paper_kv(m.short.k_branch, x_short[sv]))
    torch.testing.assert_close(v_s[sv], paper_kv(m.short.v_branch, x_short[sv]))


# ---------------------------------------------------------------------------------------------- HSTU
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


# ------------------------------------------------------------------------------------- d_user auto
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


# ------------------------------------------------------------------------------ training + checkpoint
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from collectivekv.pipeline.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        taste = rng.integers(0, 2)
        for e in range(int(rng.integers(5, 40))):
            item = int(rng.integers(1, 41))
            rows.append((u + 1, item, 5.0 if item % 2 == taste else 1.0, 1000 * e + u))
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(root / "r.csv", index=False)
    pd.DataFrame({"movieId": range(1, 41), "title": "t", "genres": ["A|B", "C", "B|D", "(no genres listed)"] * 10}
                 ).to_csv(root / "m.csv", index=False)  # fmt: skip
    prepare(PrepareConfig(events=root / "r.csv", items=root / "m.csv", out=root / "data", rating_col="rating",
                          rating_threshold=4.0))  # fmt: skip
    return root / "data"


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_trainer_trains_and_checkpoints_every_zoo_model(arch: str, tiny_dataset: Path, tmp_path: Path) -> None:
    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.pipeline.data.dataset_schema import load_dataset
    from collectivekv.pipeline.data.history import HistoryIndex
    from collectivekv.pipeline.training.checkpoint import save_checkpoint
    from collectivekv.pipeline.training.trainer import TrainConfig, build_model, predict, train_model

    ds = load_dataset(tiny_dataset)
    cfg = zoo_config(arch, long_len=30, max_len=8 if arch != "hstu" else 16)
    result = train_model(build_model(ds, cfg, 0), ds, TrainConfig(epochs=1, batch_size=128, progress=False))
    assert type(result.model) is MODELS[arch] and 0.0 <= result.test["auc"] <= 1.0
    save_checkpoint(tmp_path / "ck", result.model, result.metrics())
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config.arch == arch
    index = HistoryIndex(ds.histories)
    torch.testing.assert_close(
        torch.from_numpy(predict(ck.model, index, ds.samples["test"], 64)),
        torch.from_numpy(predict(result.model, index, ds.samples["test"], 256)),
    )


# ------------------------------------------------------------------------------------------- CLIs
def test_ckv_train_zoo_arch_with_d_user_auto(tiny_dataset: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from collectivekv.cachestore.checkpoint import load_checkpoint
    from collectivekv.jobs.cli import main

    args = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "ck"), "--arch", "eta", "--d-user", "auto",
            "--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--pool-size", "16", "--max-len", "5",
            "--long-len", "20", "--topk", "4", "--epochs", "1", "--batch-size", "128", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(tmp_path / "ck")
    auto = ck.metrics["d_user_auto"]
    assert ck.config.arch == "eta" and ck.config.collective.d_user == auto["d_user"] >= 1
    assert set(auto["groups"]) == {"short.k", "short.v", "long.k", "long.v"}


def test_ckv_eval_quick_writes_tables_plots_and_resumes(tiny_dataset: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    args = ["eval", "--quick", "--data", str(tiny_dataset), "--out", str(tmp_path / "ev"), "--models", "sim,hstu",
            "--sections", "table1,table3,fig4,fig5,auto", "--d-user", "auto"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "ev"
    report = json.loads((out / "results.json").read_text())
    assert {e["arch"] for e in report["sections"]["table1"]} == {"sim", "hstu"}
    assert len(report["sections"]["table3"]) == 5 and report["auto_vs_fixed"]["arch"] == "sim"
    assert (out / "fig4_d_user.png").stat().st_size > 0 and (out / "fig5_pool.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "QUICK SMOKE RUN" in md and "| SIM | collective |" in md
    n_runs = len(list((out / "runs").glob("*.json")))
    res = CliRunner().invoke(main, args)  # every run is on disk: nothing is trained again
    assert res.exit_code == 0 and "to train" not in res.output
    assert len(list((out / "runs").glob("*.json"))) == n_runs
    # --report-only over a partial evaluation: remove the HSTU collective runs, report without training
    hstu_coll = [p for p in (out / "runs").glob("*.json")
                 if json.loads(p.read_text())["arch"] == "hstu" and json.loads(p.read_text())["config"]["kv_mode"]
                 == "collective"]  # fmt: skip
    assert hstu_coll
    for p in hstu_coll:
        p.unlink()
    res = CliRunner().invoke(main, [*args, "--report-only"])
    assert res.exit_code == 0, res.output
    assert "run(s) to train" not in res.output and len(list((out / "runs").glob("*.json"))) == n_runs - len(hstu_coll)
    md = (out / "results.md").read_text()
    assert "| HSTU | collective | | pending (not run yet)" in md and "- table1: hstu collective" in md
    assert json.loads((out / "results.json").read_text())["pending"] == ["table1: hstu collective"]


def test_eval_regularisation_options_reach_every_run_and_table3_keeps_the_paper_weights() -> None:
    """`ckv eval --dropout --weight-decay --peak-weight --balance-weight`: every planned run carries them
    (new run ids, so earlier results are not reused for other settings); Table 3's "+loss" rows still
    switch a loss on at the paper's weight when the base has it off."""
    from collectivekv.pipeline.training.trainer import TrainConfig
    from collectivekv.pipeline.training.zoo_eval import EvalSettings, plan_rows
    from collectivekv.pipeline.training.zoo_eval_runs import run_id

    base = ModelConfig(n_items=50, embed_dim=16, d_attn=32, n_heads=2, max_len=10, long_len=40, topk=5,
                       collective=CollectiveConfig(d_user=1, pool_size=64))
    plain = EvalSettings(base=base, train=TrainConfig(), sections=("table1", "table3"), models=("sim",))
    reg = dataclasses.replace(
        plain, train=TrainConfig(weight_decay=1e-5),
        base=dataclasses.replace(base, dropout=0.3,
                                 collective=dataclasses.replace(base.collective, balance_weight=0.0)))
    rows = {(r.section, r.label): r.cfg for r in plan_rows(reg)}
    coll = rows[("table1", "collective")]
    assert coll.dropout == 0.3 and coll.collective.balance_weight == 0.0 and coll.collective.peak_weight == 0.01
    assert rows[("table1", "full")].dropout == 0.3
    assert rows[("table3", "+balance loss")].collective.balance_weight == 1.0
    assert rows[("table3", "+all losses")].collective.balance_weight == 1.0
    assert rows[("table3", "CollectiveKV (no router losses)")].collective.peak_weight == 0.0
    old = {(r.section, r.label): r.cfg for r in plan_rows(plain)}
    assert run_id(coll, 0, reg.train) != run_id(old[("table1", "collective")], 0, plain.train)
    assert run_id(old[("table3", "+all losses")], 0, plain.train) == run_id(old[("table1", "collective")], 0,
                                                                            plain.train)  # shared as before


def test_sdim_codes_that_cannot_be_cached_are_refused_at_config_time() -> None:
    """A behaviour's bucket codes are cached in one 63-bit key: 8 hashes x 8 bits would fail only at prefill."""
    with pytest.raises(ValueError, match="sdim_hashes x sdim_bits must be <= 63"):
        zoo_config("sdim", sdim_hashes=8, sdim_bits=8)
    assert zoo_config("sdim", sdim_hashes=9, sdim_bits=7).sdim_hashes == 9
    assert zoo_config("sim", sdim_hashes=8, sdim_bits=8).arch == "sim"  # other models do not cache bucket codes


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


@pytest.mark.parametrize("arch", ["din", "sim", "hstu"])
def test_a_history_longer_than_the_window_is_scored_on_its_latest_behaviours(arch: str) -> None:
    """Every model caches the latest window_len behaviours; its forward reads the same ones (din read all)."""
    from collectivekv.model.attention import tail_window

    cfg = zoo_config(arch)
    model = make_model(cfg, seed=0).eval()
    w = cfg.window_len
    items, feedback, lengths, targets = make_batch([w + 5, w + 1, 2], w + 5, 3)
    short = tail_window(items, feedback, lengths, w)
    with torch.no_grad():
        torch.testing.assert_close(model(items, feedback, lengths, targets)[0], model(*short, targets)[0])


@pytest.mark.parametrize(("arch", "change", "message"), [
    ("din", {"n_heads": 0}, "n_heads must be >= 1"), ("din", {"n_heads": -4}, "n_heads must be >= 1"),
    ("din", {"max_genres": 0}, "max_genres must be >= 1"), ("din", {"n_genres": -1}, "n_genres must be >= 0"),
    ("sim", {"n_genres": 63}, "at most 62 categories"), ("din", {"dropout": 1.5}, r"dropout must be in \[0, 1\)")])
def test_configs_that_would_fail_later_are_refused_at_once(arch: str, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        zoo_config(arch, **change)


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_an_empty_batch_decodes_to_no_scores(arch: str) -> None:
    cfg = zoo_config(arch)
    model = make_model(cfg, seed=0).eval()
    items, feedback, lengths, targets = make_batch([], cfg.window_len, 0)
    with torch.no_grad():
        assert model.decode(model.prefill(items, feedback, lengths), targets).shape[0] == 0
