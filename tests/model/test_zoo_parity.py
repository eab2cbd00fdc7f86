"""Every zoo model's cache (SIM, ETA, SDIM, TWIN, HSTU; full, CollectiveKV, K or V shared only):
``decode(prefill(x)) == forward(x)`` exactly, the K/V rebuilt from the cache == the K/V the attention received
inside ``forward`` == the paper's equations, the window of latest behaviours, and an empty batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collectivekv.model.blocks as blocks_module
import collectivekv.model.longseq as longseq_module
from collectivekv.model.retrieval import gather_positions
from collectivekv.model.zoo import PAPER_MODELS
from tests.model.zoo_helpers import VARIANTS, make_batch, make_model, paper_kv, valid_of, zoo_config

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


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_an_empty_batch_decodes_to_no_scores(arch: str) -> None:
    cfg = zoo_config(arch)
    model = make_model(cfg, seed=0).eval()
    items, feedback, lengths, targets = make_batch([], cfg.window_len, 0)
    with torch.no_grad():
        assert model.decode(model.prefill(items, feedback, lengths), targets).shape[0] == 0
