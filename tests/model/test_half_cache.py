""""Half the cache": one router index shared by K and V (``kv_index="joint"``) and int8 user parts
(``user_dtype="int8"``): the entry's parts and CR, the joint routing, the fake quantisation and its scale, and
parity of the cached decode (entry parts → codes → cache) with the eval forward for every model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from collectivekv.model.cache_spec import compression_rate, entry_bytes, entry_parts
from collectivekv.model.config import CollectiveConfig, ModelConfig, config_from_dict, config_to_dict
from collectivekv.model.diagnostics import RoutingProbe, shared_branches
from collectivekv.model.entry import cache_from_arrays, entry_arrays, user_scales
from collectivekv.model.pool import BlockTables, block_rows, block_table
from collectivekv.model.quant import QMAX, SCALE_MOMENTUM, fake_quant, int8_codes
from collectivekv.model.retrieval import genre_blocks, sdim_buckets
from collectivekv.model.zoo import MODELS
from tests.model.zoo_helpers import N_ITEMS, make_batch, make_model, zoo_config

HALF = dict(kv_index="joint", user_dtype="int8")
OPTIONS = {"joint": dict(kv_index="joint"), "int8": dict(user_dtype="int8"), "half": HALF}


def din_paper(**kw: object) -> ModelConfig:
    return ModelConfig(n_items=100, d_attn=256, max_len=50, collective=CollectiveConfig(d_user=1, pool_size=10_000),
                       **kw)  # fmt: skip


def observed(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    """``model`` after one training-mode forward (observes the int8 scales; no optimiser step), in eval."""
    items, feedback, lengths, targets = batch
    model.train()
    with torch.no_grad():
        model(items, feedback, lengths, targets)
    return model.eval()


def test_din_half_cache_is_4_bytes_per_behaviour_cr_0195_percent() -> None:
    half = din_paper(**HALF)
    assert [(p.name, p.kind, p.width) for p in entry_parts(half)] == [
        ("kv.k_user", "q8", 1), ("kv.v_user", "q8", 1), ("kv.kv_idx", "idx", 1)]
    assert entry_bytes(half, 1) == 4
    assert compression_rate(half) == pytest.approx(4 / 2048)
    assert compression_rate(din_paper()) == pytest.approx(8 / 2048)  # separate + float16: unchanged
    assert compression_rate(din_paper(kv_index="joint")) == pytest.approx(6 / 2048)
    assert compression_rate(din_paper(user_dtype="int8")) == pytest.approx(6 / 2048)


def test_sdim_long_group_keeps_its_v_index_and_full_store_has_no_codes() -> None:
    cfg = zoo_config("sdim", **HALF)
    names = {p.name: p.kind for p in entry_parts(cfg)}
    assert names["short.kv_idx"] == "idx" and names["long.v_idx"] == "idx" and "long.kv_idx" not in names
    assert names["long.v_user"] == "q8"
    full = entry_parts(dataclasses.replace(cfg, kv_mode="full"))
    assert {p.kind for p in full} == {"kv", "key"}


def test_config_fields_are_left_out_at_defaults_and_checked() -> None:
    cfg = zoo_config("din")
    assert "kv_index" not in config_to_dict(cfg) and "user_dtype" not in config_to_dict(cfg)
    half = dataclasses.replace(cfg, **HALF)
    assert config_from_dict(config_to_dict(half)) == half
    with pytest.raises(ValueError, match="both K and V shared"):
        dataclasses.replace(cfg, kv_index="joint", collective=CollectiveConfig(d_user=2, pool_size=12, share_v=False))
    with pytest.raises(ValueError, match="user_dtype"):
        dataclasses.replace(cfg, user_dtype="int4")


def test_default_models_keep_their_parameter_names() -> None:
    for arch in MODELS:
        names = set(make_model(zoo_config(arch)).state_dict())
        assert not any("kv_router" in n or "user_scale" in n for n in names), arch
        half = set(make_model(zoo_config(arch, **HALF)).state_dict())
        assert any(n.endswith("kv_router.pool") for n in half) and any(n.endswith("user_scale") for n in half)
        assert not any(n.endswith("k_branch.pool") or n.endswith("k_branch.router.weight") for n in half), arch


def test_joint_routing_one_index_one_pool_losses_once() -> None:
    cfg = zoo_config("din", kv_index="joint")
    m = make_model(cfg)
    items, feedback, lengths, targets = make_batch([3, 4, 1], cfg.max_len, seed=1)  # within the window
    router = m.kv_router
    assert router.pool.shape == (12, 2 * (32 - 2))
    assert m.k_branch.collective_pool().data_ptr() == router.pool.data_ptr()
    assert torch.equal(m.v_branch.collective_pool(), router.pool[:, 30:])
    m.train()
    cache, losses = m.prefill_with_losses(items, feedback, lengths)
    assert cache.k_idx is cache.v_idx and cache.k_gate is cache.v_gate
    tokens = m.behaviour_tokens(items, feedback, lengths)
    once = router.route(tokens, soft=True)
    assert torch.allclose(losses.peak, once.peak) and torch.allclose(losses.balance, once.balance)
    logits, losses = m(items, feedback, lengths, targets)
    m.loss(logits, targets.remainder(2).float(), losses).backward()
    assert router.pool.grad is not None and router.pool.grad[:, :30].abs().sum() > 0
    assert router.pool.grad[:, 30:].abs().sum() > 0 and router.router.weight.grad.abs().sum() > 0
    assert m.k_branch.proj.weight.grad.abs().sum() > 0


def test_fake_quant_values_gradient_and_scale_observer() -> None:
    u = torch.tensor([-3.0, -0.01, 0.0, 0.5, 2.0], requires_grad=True)
    s = torch.tensor(2.0 / QMAX)
    out = fake_quant(u, s)
    assert torch.equal(out, int8_codes(u, s).float() * s)
    assert int8_codes(u, s).tolist() == [-127, -1, 0, 32, 127]
    out.sum().backward()
    assert u.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]  # clamped code: no gradient
    m = make_model(zoo_config("din", user_dtype="int8"))
    scale = m.k_branch.user_scale
    assert float(scale) == 0.0
    batch = make_batch([3, 5, 1], 6, seed=2)
    with pytest.raises(ValueError, match="never observed"):
        m.eval().prefill(*batch[:3])
    m.train()
    tokens = m.behaviour_tokens(*batch[:3])
    first = torch.nn.functional.silu(m.k_branch.proj(tokens.x_unique)).abs().max() / QMAX
    m.prefill(*batch[:3])
    assert torch.allclose(scale, first)
    batch2 = make_batch([6, 6], 6, seed=3)
    tokens2 = m.behaviour_tokens(*batch2[:3])
    second = torch.nn.functional.silu(m.k_branch.proj(tokens2.x_unique)).abs().max() / QMAX
    m.prefill(*batch2[:3])
    assert torch.allclose(scale, first + SCALE_MOMENTUM * (second - first))
    frozen = scale.clone()
    m.eval().prefill(*batch2[:3])
    assert torch.equal(scale, frozen)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cached_decode_of_entry_parts_equals_eval_forward(arch: str, option: str) -> None:
    cfg = zoo_config(arch, **OPTIONS[option])
    w = cfg.window_len  # din caches its whole (B, L) batch: entries hold at most window_len rows
    batch = make_batch([0, 1, min(4, w), w, w - 1], w, seed=4)
    m = observed(make_model(cfg, seed=5), batch)
    items, feedback, lengths, targets = batch
    with torch.no_grad():
        want, _ = m(items, feedback, lengths, targets)
        cache = m.prefill(items, feedback, lengths)
        scales = user_scales(m, cfg)
        arrays = entry_arrays(cache if arch != "din" else _as_zoo(cache), cfg, scales)
        for p in entry_parts(cfg):
            if p.kind == "q8":
                assert arrays[p.name].dtype == torch.int8 and p.name in scales
                assert int(arrays[p.name].abs().max()) <= QMAX
        rebuilt = cache_from_arrays(arrays, cache.lengths, cfg, scales)
        got = m.decode(rebuilt.kv["kv"] if arch == "din" else rebuilt, targets)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


def _as_zoo(cache):  # noqa: ANN001, ANN202  (din's KVCache as the one-group ZooCache entry_arrays reads)
    from collectivekv.model.blocks import ZooCache

    return ZooCache(lengths=cache.lengths, kv={"kv": cache}, keys={})


def test_int8_codes_need_the_scales() -> None:
    cfg = zoo_config("din", **HALF)
    batch = make_batch([2, 3], 4, seed=6)
    m = observed(make_model(cfg), batch)
    with torch.no_grad():
        cache = _as_zoo(m.prefill(*batch[:3]))
    with pytest.raises(ValueError, match="kv.k_user holds int8 codes"):
        entry_arrays(cache, cfg)


def test_routing_probe_sees_the_joint_router() -> None:
    cfg = zoo_config("sim", kv_index="joint")
    m = make_model(cfg).eval()
    assert set(shared_branches(m)) == {"short.kv_router", "long.kv_router"}
    with RoutingProbe(m) as probe, torch.no_grad():
        m.prefill(*make_batch([4, 9], 10, seed=7)[:3])
    assert set(probe.summary()["pools"]) == {"short.kv_router", "long.kv_router"}


def test_eta_keyed_by_its_pool_rows_caches_no_key() -> None:
    """ETA, ``retrieval_keys="pool"``: no key part (half cache at the paper's shape: CR 0.195%, as TWIN), the codes are
    those of the long K pool rows the router picked, the cached decode equals the eval forward, and the option is left
    out of every config it does not change (full models, other archs, an unshared long K)."""
    paper = ModelConfig(n_items=100, arch="eta", collective=CollectiveConfig(pool_size=2000), retrieval_keys="pool",
                        **HALF)
    assert not [p for p in entry_parts(paper) if p.kind == "key"]
    assert compression_rate(paper) == pytest.approx(4 / 2048)
    assert config_to_dict(paper)["retrieval_keys"] == "pool" and config_from_dict(config_to_dict(paper)) == paper
    for inert in (dataclasses.replace(paper, kv_mode="full"), dataclasses.replace(paper, arch="twin"),
                  dataclasses.replace(paper, kv_index="separate", collective=CollectiveConfig(share_k=False))):
        assert not inert.pool_keys and "retrieval_keys" not in config_to_dict(inert)
    with pytest.raises(ValueError, match="retrieval_keys"):
        ModelConfig(n_items=1, retrieval_keys="items")
    cfg = zoo_config("eta", retrieval_keys="pool", **HALF)
    batch = make_batch([0, 1, 4, cfg.window_len], cfg.window_len, seed=4)
    m = observed(make_model(cfg, seed=5), batch)
    items, feedback, lengths, targets = batch
    with torch.no_grad():
        want, _ = m(items, feedback, lengths, targets)
        cache = m.prefill(items, feedback, lengths)
        assert cache.keys == {}
        codes = m.behaviour_codes(cache)  # (B, L)
        idx = cache.kv["long"].k_idx
        valid = torch.arange(idx.shape[1]) < lengths[:, None]
        assert torch.equal(codes[valid], m.pool_codes()[idx[valid]]) and not codes[~valid].any()
        rebuilt = cache_from_arrays(entry_arrays(cache, cfg, user_scales(m, cfg)), cache.lengths, cfg,
                                    user_scales(m, cfg))
        assert torch.allclose(m.decode(rebuilt, targets), want, atol=1e-6, rtol=1e-6)


def test_genre_blocks_and_block_tables() -> None:
    sets, block = genre_blocks(torch.tensor([0, 5, 3, 5, 9, 3]))  # row 0: the padding item
    assert sets.tolist() == [3, 5, 9] and block.tolist() == [0, 1, 0, 1, 2, 0]
    rows = torch.arange(6.0).reshape(3, 2)  # S = 3 shared rows
    table = block_table(rows, 2, 7)  # 2 blocks of 3 index values, then one zero row
    assert torch.equal(table, torch.cat([rows, rows, torch.zeros(1, 2)])) and block_table(rows, 1, 3) is rows
    assert block_rows(7, 2) == 3
    with pytest.raises(ValueError, match="at most 2 blocks, got 3"):
        block_rows(2, 3)


def test_block_tables_are_kept_at_inference_and_rebuilt_in_training() -> None:
    tables, rows = BlockTables(), torch.nn.Parameter(torch.randn(3, 2))
    with torch.no_grad():
        first = tables.get(rows, 2, 7)
        assert tables.get(rows, 2, 7) is first and torch.equal(first, block_table(rows, 2, 7))
        rows.add_(1.0)  # a new version of the pool: a new table
        assert torch.equal(tables.get(rows, 2, 7), block_table(rows, 2, 7))
        rows.data = rows.data.double()  # what Module.double() / .to() do: same Parameter, new storage
        assert tables.get(rows, 2, 7).dtype == torch.float64
    trained = tables.get(rows, 2, 7)
    assert trained.requires_grad and trained is not tables.table
    trained.sum().backward()
    assert torch.equal(rows.grad, torch.full((3, 2), 2.0))  # each row read by both blocks


@pytest.mark.parametrize("option", ["half", "separate"])
def test_sim_keyed_by_its_pool_rows_caches_no_key(option: str) -> None:
    """SIM, ``retrieval_keys="pool"``: no key part (CR 0.195% at the paper's shape with the half cache); every index
    (soft routing in training, hard in eval; short and long groups) is its item's genre-set block start + a shared
    row, so the keys read through the indices are the item-keyed ones and the retrieval is unchanged; the cached
    decode equals the forward."""
    paper = ModelConfig(n_items=100, n_genres=20, arch="sim", collective=CollectiveConfig(pool_size=65_536),
                        retrieval_keys="pool", **HALF)
    assert not [p for p in entry_parts(paper) if p.kind == "key"]
    assert compression_rate(paper) == pytest.approx(4 / 2048)
    extra = HALF if option == "half" else {}
    cfg = zoo_config("sim", retrieval_keys="pool", collective=CollectiveConfig(d_user=2, pool_size=256), **extra)
    batch = make_batch([0, 1, 4, cfg.window_len], cfg.window_len, seed=4)
    m = observed(make_model(cfg, seed=5), batch)
    items, feedback, lengths, targets = batch
    sets, block = genre_blocks(m.categories(torch.arange(N_ITEMS + 1)))
    rows = 256 // sets.numel()
    assert m.long.k_branch.collective_pool().shape[0] == 256 and m.short.v_branch.collective_pool().shape[0] == 256
    valid = torch.arange(items.shape[1]) < lengths[:, None]
    m.train()
    soft, _ = m.prefill_with_losses(items, feedback, lengths)
    for group in ("short", "long"):
        idx = soft.kv[group].k_idx
        mask = torch.arange(idx.shape[1]) < soft.kv[group].lengths[:, None]
        assert torch.equal((idx // rows)[mask], block[tail(items, lengths, idx.shape[1])][mask])
    m.eval()
    with torch.no_grad():
        want, _ = m(items, feedback, lengths, targets)
        cache = m.prefill(items, feedback, lengths)
        assert cache.keys == {}
        assert torch.equal(m.behaviour_codes(cache)[valid], m.categories(items)[valid])
        assert not m.behaviour_codes(cache)[~valid].any()
        item_keyed = dataclasses.replace(cache, keys={"categories": torch.where(valid, m.categories(items), 0)})
        assert all(torch.equal(a, b) for a, b in zip(m.retrieve(cache, targets[:, None]),
                                                     m.retrieve(item_keyed, targets[:, None]), strict=True))
        rebuilt = cache_from_arrays(entry_arrays(cache, cfg, user_scales(m, cfg)), cache.lengths, cfg,
                                    user_scales(m, cfg))
        assert torch.allclose(m.decode(rebuilt, targets), want, atol=1e-6, rtol=1e-6)


def tail(items: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) the last min(length, width) items of each row, valid first (the short window's positions)."""
    start = (lengths - lengths.clamp(max=width)).unsqueeze(1)  # (B, 1)
    return items.gather(1, (start + torch.arange(width)).clamp(max=items.shape[1] - 1))


def test_sdim_keyed_by_its_index_caches_no_key_and_no_long_user_part() -> None:
    """SDIM, ``retrieval_keys="pool"``: every index is its item's bucket code · S + a shared row, the long V is the
    pool row alone (no user part), so at the paper's shape with 2 hashes of 4 bits a long behaviour is its 2-byte
    index: CR 2,200 / 1,126,400 = 0.195%; the buckets read through the indices are the item's, and the cached decode
    equals the forward."""
    paper = ModelConfig(n_items=100, arch="sdim", collective=CollectiveConfig(pool_size=65_536), sdim_hashes=2,
                        sdim_bits=4, retrieval_keys="pool", **HALF)
    assert [p.name for p in entry_parts(paper)] == ["short.k_user", "short.v_user", "short.kv_idx", "long.v_idx"]
    assert entry_bytes(paper) == 50 * 4 + 1000 * 2
    assert compression_rate(paper) == pytest.approx(2200 / ((50 * 2 + 1000) * 256 * 4))
    with pytest.raises(ValueError, match="65536 codes > pool_size 2000"):  # 4 hashes of 4 bits
        ModelConfig(n_items=100, arch="sdim", collective=CollectiveConfig(pool_size=2000), retrieval_keys="pool")
    cfg = zoo_config("sdim", retrieval_keys="pool", collective=CollectiveConfig(d_user=2, pool_size=256), **HALF)
    batch = make_batch([0, 1, 4, cfg.window_len], cfg.window_len, seed=4)
    m = observed(make_model(cfg, seed=5), batch)
    items, feedback, lengths, targets = batch
    valid = torch.arange(items.shape[1]) < lengths[:, None]
    assert m.long.v_branch.proj is None and m.key_rows == 256 // 2 ** (cfg.sdim_hashes * cfg.sdim_bits)
    with torch.no_grad():
        want, _ = m(items, feedback, lengths, targets)
        cache = m.prefill(items, feedback, lengths)
        assert cache.keys == {} and cache.kv["long"].v_user.shape[-1] == 0
        vectors, rows = m.item_vectors(items, lengths)
        buckets = sdim_buckets(vectors, m.hash_planes)[rows]  # (B, L, m): the items' own buckets
        assert torch.equal(m.behaviour_codes(cache)[valid], buckets[valid])
        rebuilt = cache_from_arrays(entry_arrays(cache, cfg, user_scales(m, cfg)), cache.lengths, cfg,
                                    user_scales(m, cfg))
        assert torch.allclose(m.decode(rebuilt, targets), want, atol=1e-6, rtol=1e-6)


def test_int8_scale_ignores_batches_that_tell_nothing() -> None:
    """An all-zero or non-finite batch leaves the scale as it was (inf made every code 0, then NaN; an all-zero first
    batch counted as observed at 1e-38); a non-finite loaded scale is named."""
    from collectivekv.model.quant import check_scale, observe_scale

    scale = torch.zeros(())
    for bad in (torch.zeros(4), torch.tensor([1.0, float("inf")]), torch.tensor([float("nan"), 1.0])):
        observe_scale(scale, bad)
        assert float(scale) == 0.0
    observe_scale(scale, torch.tensor([1.27, -0.5]))
    observe_scale(scale, torch.tensor([float("inf")]))
    assert float(scale) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="never observed"):
        check_scale(torch.zeros(()), "kv")
    with pytest.raises(ValueError, match="diverged"):
        check_scale(torch.tensor(float("inf")), "kv")
