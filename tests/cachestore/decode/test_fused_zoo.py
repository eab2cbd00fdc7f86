"""The zoo models' fused decode from the packed batch bytes (cachestore/decode/fused_zoo.py,
cachestore/decode/fused_long.py)
against the model's own training forward (``model.decode(model.prefill(...))``) and the eager serving path
(``unpack_entry`` + ``entry_cache`` + ``decode_zoo``).

Batches are packed with the real ``HostBatcher.pack`` from records encoded by the v2 prefill rows of
``tests/zoo_store_fixtures.py`` (the model's own cache; full-KV stores hold every group rebuilt at d_a).
Histories cover n = 0, n < max_len, max_len < n < long_len, n = long_len (and longer, cut to the window)
plus a cold-start slot. On CUDA the kernels run compiled; on CPU under Triton's interpreter (conftest
sets TRITON_INTERPRET=1), skipped where Triton is absent. With fp32 pool rows the fused decode computes the
model's fp32 math on the stored user parts (an fp16 store: on the fp16-rounded parts) up to summation order;
with the default pool rows at the store's precision, up to the rounding of the pool rows too."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode import fused_zoo, fused_zoo_long
from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import ResidentZooModel, decode_zoo, entry_cache
from collectivekv.cachestore.decode.fused import FusedConfig, fused_available
from collectivekv.cachestore.decode.fused_long import SCORE_FILL, bucket_sums, unit_mean
from collectivekv.cachestore.decode.fused_select import key_select, row_topk
from collectivekv.cachestore.decode.fused_view import record_part_starts
from collectivekv.cachestore.decode.fused_zoo import zoo_static_decode
from collectivekv.cachestore.decode.transfer import unpack_entry
from collectivekv.cachestore.store.entry import entry_from_parquet_row, entry_layout
from collectivekv.cachestore.store.record import RouterIndexError
from collectivekv.model.attention import masked_softmax
from collectivekv.model.blocks import ZooCache
from collectivekv.model.cache_spec import store_config
from collectivekv.model.config import LONG_ARCHS, CollectiveConfig
from collectivekv.model.entry import full_cache
from collectivekv.model.retrieval import category_topk, hamming_topk, popcount
from tests.model.zoo_helpers import N_ITEMS, make_batch, make_model, zoo_config
from tests.zoo_store_fixtures import zoo_prefill_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VERSION = "0123456789abcdef"
EXACT = FusedConfig(pool_dtype="float32", block_l=4)  # the model's pool rows exactly
STORES = [("collective", "float32"), ("collective", "float16"), ("full", "float32")]
N_CAND = 2


def lengths_of(cfg) -> list[int]:
    """n = 0, 1 < max_len, max_len < n < long_len, long_len, longer than the window."""
    return [0, 1, cfg.max_len + 2, cfg.long_len, cfg.long_len + 3]


@dataclasses.dataclass
class Case:
    model: torch.nn.Module
    resident: ResidentZooModel
    layout: object
    raw: torch.Tensor
    n_users: int
    hist: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    candidates: torch.Tensor
    records: list = dataclasses.field(default_factory=list)  # the users' records (the cold slot's is None)


def packed(arch: str, mode: str, kv_dtype: str, seed: int = 1, **cfg: object) -> Case:
    """A batch of lengths_of(cfg) users + one cold slot, packed as the runtime packs it, on DEVICE."""
    model = make_model(zoo_config(arch, **cfg), seed=seed).eval()
    lengths = lengths_of(model.cfg)
    items, feedback, lens, _ = make_batch(lengths, max(lengths), seed)
    layout = entry_layout(model.cfg, VERSION, mode, kv_dtype)
    users = list(range(len(lengths)))
    records = [entry_from_parquet_row(layout, **row) for row in zoo_prefill_rows(model, layout, users, items,
                                                                                  feedback, lens)]
    host = HostBatcher(layout, pin=False).pack([*users, 999], [*records, None])
    n_users = len(users) + 1
    zero = torch.zeros(1, items.shape[1], dtype=torch.long)
    hist = (torch.cat([items, zero]), torch.cat([feedback, zero]), torch.cat([lens, torch.zeros(1, dtype=torch.long)]))
    g = torch.Generator().manual_seed(seed)
    candidates = torch.randint(1, N_ITEMS + 1, (n_users, N_CAND), generator=g)
    raw = host.tensor.clone().to(DEVICE)
    return Case(model, ResidentZooModel(copy.deepcopy(model), DEVICE), layout, raw, n_users, hist, candidates,
                [*records, None])


def rounded(cache: ZooCache) -> ZooCache:
    """The cache with its user parts rounded through fp16, as an fp16 store holds them."""
    kv = {n: dataclasses.replace(c, k_user=c.k_user.half().float(), v_user=c.v_user.half().float())
          for n, c in cache.kv.items()}  # fmt: skip
    return dataclasses.replace(cache, kv=kv)


def model_logits(case: Case, mode: str, kv_dtype: str) -> torch.Tensor:
    """The training model's ``decode(prefill(history))`` (the cache as the store holds it)."""
    with torch.no_grad():
        cache = case.model.prefill(*case.hist)
        if kv_dtype == "float16":
            cache = rounded(cache)
        if mode == "full":
            cache = full_cache(case.model, cache)
        return case.model.decode(cache, case.candidates)


def eager_logits(case: Case) -> torch.Tensor:
    """The eager serving path: every part unpacked and padded, the model's own decode."""
    with torch.inference_mode():
        batch = unpack_entry(case.raw, case.layout, case.n_users, case.layout.max_len, 16 * case.n_users)
        cache = entry_cache(batch, store_config(case.model.cfg, case.layout.mode), case.resident.dtype)
        return decode_zoo(case.resident, cache, case.candidates.to(DEVICE)).cpu()


def fused_logits(case: Case, config: FusedConfig = EXACT, flags: torch.Tensor | None = None, **kw: object
                 ) -> torch.Tensor:
    """``zoo_static_decode`` of the case (``kw``: its chunks / on_chunk), on the CPU."""
    with torch.inference_mode():
        return zoo_static_decode(case.raw, case.candidates.to(DEVICE), resident=case.resident, layout=case.layout,
                                 n_users=case.n_users, config=config, flags=flags, **kw).cpu()


@pytest.mark.parametrize(("mode", "kv_dtype"), STORES)
@pytest.mark.parametrize("arch", LONG_ARCHS)
def test_fused_zoo_equals_model_and_eager(arch: str, mode: str, kv_dtype: str) -> None:
    case = packed(arch, mode, kv_dtype)
    got = fused_logits(case)
    assert got.shape == (case.n_users, N_CAND) and torch.isfinite(got).all()
    torch.testing.assert_close(got, model_logits(case, mode, kv_dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, eager_logits(case), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the cold slot scores like an empty history
        empty = case.model(*(h[-1:] for h in case.hist), case.candidates[-1:])[0]
    torch.testing.assert_close(got[-1:], empty, rtol=1e-5, atol=1e-5)


def test_fused_twin_breaks_ties_towards_the_later_behaviour() -> None:
    """A 2-row pool makes the heads without user dims score many behaviours equal: the top-k among equal
    scores is the model's (stable, later behaviour first), so the logits still equal the model's."""
    case = packed("twin", "collective", "float32", seed=8, collective=CollectiveConfig(d_user=2, pool_size=2))
    torch.testing.assert_close(fused_logits(case), model_logits(case, "collective", "float32"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sim", "eta"])
def test_fused_zoo_split_histories(arch: str) -> None:
    """Rows (and retrieved positions) split into parts, one program each, combined after: same logits."""
    case = packed(arch, "collective", "float32", seed=6)
    got = fused_logits(case, dataclasses.replace(EXACT, block_l=1, split_l=2))
    torch.testing.assert_close(got, model_logits(case, "collective", "float32"), rtol=1e-5, atol=1e-5)


def _assert_row_topk_is_the_stable_sort(s: torch.Tensor, k: int) -> None:
    """row_topk of ``s`` (..., cap) == the first k of the stable descending sort of the flipped rows (equal scores:
    later position first), in position order, values and positions."""
    _, rev = s.flip(-1).sort(dim=-1, descending=True, stable=True)
    want_i = (s.shape[-1] - 1 - rev[..., :k]).sort(dim=-1).values  # the stable sort's first k, in position order
    got_v, got_i = row_topk(s.to(DEVICE), k)
    assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_v.cpu(), s.gather(-1, want_i))


@pytest.mark.parametrize(("cap", "k"), [(200, 50), (7, 7), (33, 5), (16, 1)])
def test_row_topk_is_the_stable_sort_of_the_flipped_scores(cap: int, k: int) -> None:
    """TWIN's per-head top-k: the k largest, equal scores (many here, and ±0.0) later position first, in position
    order."""
    g = torch.Generator().manual_seed(cap)
    s = torch.randn(2, 2, cap, generator=g)  # (R, H, cap): 4 rows
    s[..., ::3] = s[..., 1:2]  # ties
    s[0, 0, -5:] = torch.finfo(torch.float32).min  # group_scores' fill past a user's rows
    s[1, 1, : cap // 2] = -0.0
    s[1, 1, cap // 2 :] = 0.0
    _assert_row_topk_is_the_stable_sort(s, k)
    with pytest.raises(ValueError, match="row_topk takes"):
        row_topk(s.to(DEVICE), cap + 1)


@given(seed=st.integers(0, 10_000), cap=st.integers(1, 300), k_frac=st.floats(0.0, 1.0),
       kind=st.sampled_from(["spread", "ties", "outliers", "fill", "short", "infinite"]))
@settings(max_examples=25, deadline=None)
def test_row_topk_selects_exactly_whatever_the_scores(seed: int, cap: int, k_frac: float, kind: str) -> None:
    """The selection is exact for any scores, whichever way its search is bracketed: spread values, few distinct
    values (ties at the k-th), outliers 1e30 apart, group_scores' fill past fewer or more rows than k, ±inf."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(k_frac * cap))
    s = torch.randn(3, cap, generator=g)  # (rows, cap)
    fill = SCORE_FILL
    if kind == "ties":
        s = (s * 2).round()
    elif kind == "outliers":
        s[:, ::7] *= 1e30
    elif kind in ("fill", "short"):
        real = torch.randint(0, cap + 1 if kind == "fill" else k, (3,), generator=g)  # rows before the fill
        s[torch.arange(cap) >= real[:, None]] = fill
    elif kind == "infinite":
        s[:, ::5] = float("-inf")
        s[:, 3::11] = float("inf")
    _assert_row_topk_is_the_stable_sort(s, k)


def test_row_topk_softmax_is_the_masked_softmax_of_the_top_k() -> None:
    """TWIN's weights in the kernel == ``masked_softmax`` of row_topk's values over each user's real scores (rows
    2 and 0 of users with 3 heads and 2 candidates: a user with fewer rows than k, and one with none)."""
    g = torch.Generator().manual_seed(7)
    cap, k, heads, n_cand = 12, 5, 3, 2
    rows = torch.tensor([12, 2, 0])
    s = torch.randn(3 * n_cand, heads, cap, generator=g)  # (B·C, H, cap)
    s[2 * n_cand : 3 * n_cand] = torch.finfo(torch.float32).min  # group_scores' fill
    s[n_cand : 2 * n_cand, :, 2:] = torch.finfo(torch.float32).min
    top, idx = row_topk(s.to(DEVICE), k)
    n_sel = rows.clamp(max=k).repeat_interleave(n_cand)  # (B·C,)
    got_w, got_i = row_topk(s.to(DEVICE), k, softmax_rows=rows.to(DEVICE), n_cand=n_cand)
    assert torch.equal(got_i, idx)
    torch.testing.assert_close(got_w.cpu(), masked_softmax(top.cpu(), n_sel), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("hamming", "bits", "key_bytes", "cap", "k"),
                         [(False, 5, 1, 37, 9), (True, 12, 2, 37, 9), (False, 18, 3, 37, 9), (True, 62, 8, 32, 32),
                          (False, 3, 1, 1, 1)])
def test_key_select_is_the_models_retrieval(hamming: bool, bits: int, key_bytes: int, cap: int, k: int) -> None:
    """SIM's / ETA's selection from packed key bytes == ``model.retrieval``'s (sparse categories: users with
    fewer eligible rows than k, none at all, and a user with no rows; k == cap; one row)."""
    g = torch.Generator().manual_seed(bits)
    n_cand = 2
    lengths = torch.tensor([cap, min(20, cap), 0])
    keys = torch.randint(0, 1 << bits, (3, cap), generator=g)
    if not hamming:
        keys &= torch.randint(0, 1 << bits, (3, cap), generator=g) & torch.randint(0, 1 << bits, (3, cap), generator=g)
    targets = torch.randint(0, 1 << bits, (3, n_cand), generator=g)
    targets[1, 1] = 0  # no row eligible (SIM)
    packed = torch.stack([(keys >> (8 * i)) & 0xFF for i in range(key_bytes)], -1).to(torch.uint8)  # (B, cap, kb)
    raw = torch.cat([torch.zeros(5, dtype=torch.uint8), packed.flatten()]).to(DEVICE)  # keys from an odd byte
    starts = (5 + torch.arange(3) * cap * key_bytes).to(DEVICE)
    want_i, want_n = (hamming_topk(keys, targets, lengths, k, bits) if hamming
                      else category_topk(keys, targets, lengths, k, bits))  # fmt: skip
    got_i, got_n = key_select(raw, starts, lengths.to(DEVICE), cap, key_bytes, bits, targets.to(DEVICE), hamming, k)
    assert torch.equal(got_n.cpu(), want_n.flatten())
    for r, n in enumerate(want_n.flatten().tolist()):  # the same rows, in position order; past n_sel unread
        assert got_i.cpu()[r, :n].tolist() == sorted(want_i.flatten(0, 1)[r, :n].tolist())
    with pytest.raises(ValueError, match="key_select takes"):
        key_select(raw, starts, lengths.to(DEVICE), cap, key_bytes, bits, targets.to(DEVICE), hamming, cap + 1)


@pytest.mark.parametrize(("parts", "block_l", "col_split"), [(1, 2, 1), (3, 4, 2), (2, 16, 1), (1, 4, 4)])
def test_sdim_bucket_sums_over_history_parts(parts: int, block_l: int, col_split: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SDIM's bucket sums with each history split into parts (one program each: keys and indices read, hits
    compacted, only the hits summed), small row blocks and the columns split among programs: the model's logits."""
    case = packed("sdim", "collective", "float32", seed=9)
    monkeypatch.setattr(fused_zoo_long, "bucket_sums", functools.partial(bucket_sums, parts=parts, block_l=block_l,
                                                                         col_split=col_split))
    torch.testing.assert_close(fused_logits(case), model_logits(case, "collective", "float32"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 4])
def test_unit_mean_is_sdims_aggregation(m: int) -> None:
    """L2-normalised bucket sums averaged over the hash functions (an empty bucket's zero sum stays zero), as
    ``model.retrieval``'s ``normalize(sums).mean``."""
    sums = torch.randn(5, m, 64, generator=torch.Generator().manual_seed(m)) * 30
    sums[2, 0] = 0.0
    want = torch.nn.functional.normalize(sums, dim=-1).mean(dim=1)
    torch.testing.assert_close(unit_mean(sums.to(DEVICE)).cpu(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", LONG_ARCHS)
def test_fused_zoo_store_precision_pools(arch: str) -> None:
    """The default launch reads fp16 pool rows for an fp16 store: the logits move by the pool's rounding only."""
    case = packed(arch, "collective", "float16", seed=2)
    got = fused_logits(case, FusedConfig(block_l=4))
    torch.testing.assert_close(got, model_logits(case, "collective", "float16"), rtol=0, atol=2e-2)


@pytest.mark.parametrize(("arch", "part", "user"), [("twin", "short.k_idx", 2), ("twin", "long.k_idx", 2),
                                                     ("twin", "long.v_idx", 1), ("eta", "long.v_idx", 1)])
def test_fused_zoo_flags_a_corrupt_router_index(arch: str, part: str, user: int) -> None:
    """A router index outside the pool, in a row the decode reads (user 1 has one behaviour: every long stage
    selects it), sets that user's flag (loads masked), or raises without flags."""
    case = packed(arch, "collective", "float32", seed=3)
    layout = case.layout
    n = lengths_of(case.model.cfg)[user]
    at = int(case.raw[: 8 * case.n_users].view(torch.int64)[user]) + 32
    for p, row_bytes in zip(layout.parts, layout.row_bytes, strict=True):
        if p.name == part:
            break
        at += min(n, p.cap) * row_bytes
    assert layout.idx_dtype == "uint16" and part in [p.name for p in layout.parts]
    case.raw[at : at + 2] = torch.tensor([0xFF, 0xFF], dtype=torch.uint8)  # index 65535 > pool (12 rows)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=DEVICE)
    got = fused_logits(case, flags=flags)
    assert flags.cpu().tolist() == [int(b == user) for b in range(case.n_users)]
    assert torch.isfinite(got).all()
    with pytest.raises(RouterIndexError, match=f"batch row {user}"):
        fused_logits(case)


@pytest.mark.parametrize("arch", ["sim", "twin"])
def test_fused_zoo_serves_the_first_rows_of_a_batch(arch: str) -> None:
    """Candidates for users 0 .. B - 1 of a batch of more users score as those rows of the whole batch."""
    case = packed(arch, "collective", "float32", seed=5)
    whole = fused_logits(case)
    with torch.inference_mode():
        first = zoo_static_decode(case.raw, case.candidates[:3].to(DEVICE), resident=case.resident,
                                  layout=case.layout, n_users=case.n_users, config=EXACT).cpu()
    torch.testing.assert_close(first, whole[:3], rtol=1e-6, atol=1e-6)


def test_unpack_entry_of_some_parts() -> None:
    """``unpack_entry(parts=...)`` unpacks those parts only, equal to the same parts of the whole unpack."""
    case = packed("sdim", "collective", "float16", seed=7)
    args = (case.raw, case.layout, case.n_users, case.layout.max_len, 16 * case.n_users)
    whole = unpack_entry(*args).arrays
    some = unpack_entry(*args, parts={"long.v_idx", "keys.buckets"}).arrays
    assert sorted(some) == ["keys.buckets", "long.v_idx"]
    for name, t in some.items():
        assert torch.equal(t, whole[name])


@pytest.mark.parametrize("arch", [*LONG_ARCHS, "hstu"])
def test_record_starts_is_one_launch_of_record_part_starts(arch: str) -> None:
    """The part-starts kernel (one launch) == the torch ops it replaces on CUDA, for every part of every record
    (cold users at the zero block) and each record's end."""
    case = packed(arch, "collective", "float16", seed=3)
    want = record_part_starts(case.raw, case.layout, case.n_users)
    assert want.shape == (len(case.layout.parts) + 1, case.n_users)
    assert torch.equal(fused_zoo.record_starts(case.raw, case.layout, case.n_users), want)


def test_popcount_counts_bits_without_a_table() -> None:
    """The capture-safe popcount (shifts and masks) == Python's bin().count over the low n_bits bits."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 1 << 62, (500,), generator=g), torch.tensor([0, 1, (1 << 62) - 1, (1 << 63) - 1])])
    for n_bits in (1, 5, 8, 13, 62, 63):
        want = torch.tensor([bin(int(v) & ((1 << n_bits) - 1)).count("1") for v in x])
        assert torch.equal(popcount(x, n_bits), want)


def test_fused_zoo_refuses_another_store() -> None:
    case = packed("sim", "collective", "float32")
    other = entry_layout(zoo_config("eta"), VERSION)
    with pytest.raises(ValueError, match="arch"):
        zoo_static_decode(case.raw, case.candidates, resident=case.resident, layout=other, n_users=case.n_users)
    with pytest.raises(ValueError, match="candidates"):
        zoo_static_decode(case.raw, case.candidates[None], resident=case.resident, layout=case.layout,
                          n_users=case.n_users)


@cuda
@pytest.mark.parametrize("arch", LONG_ARCHS)
def test_fused_zoo_captures_in_a_cuda_graph(arch: str) -> None:
    """Shape-static and free of host syncs: captured once, replayed on the same buffers == eager call."""
    case = packed(arch, "collective", "float16", seed=4)
    candidates = case.candidates.to(DEVICE)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        want = zoo_static_decode(case.raw, candidates, resident=case.resident, layout=case.layout,
                                 n_users=case.n_users, flags=flags)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = zoo_static_decode(case.raw, candidates, resident=case.resident, layout=case.layout,
                                    n_users=case.n_users, flags=flags)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, want.to(DEVICE), rtol=0, atol=0)
    assert not flags.any()

