"""The zoo's fused decodes (cachestore/decode/fused_zoo.py and fused_long.py: SIM, ETA, SDIM, TWIN; fused_hstu.py:
HSTU) of "half the cache" stores: a joint K/V index (``<group>.kv_idx``, read once for both pool rows) and int8 user
codes (part kind q8, fp32 code × the checkpoint's scale), against the eager serving path (``unpack_entry`` +
``entry_cache`` + ``decode_zoo``) and the model's eval forward.

Records are the model's own prefill rows (``tests/zoo_store_fixtures.py``) of users with n = 0, 1 < max_len,
max_len < n < long_len, n = long_len and a longer history (cut to the window), plus a cold-start slot (HSTU: n = 0,
1, 4 < the window, the window, a longer history). Every check
runs on the CPU under Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no CUDA device) and,
marked ``cuda``, compiled on a GPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import ResidentZooModel, decode_zoo, entry_cache
from collectivekv.cachestore.decode.fused import FusedConfig, fused_available
from collectivekv.cachestore.decode.fused_hstu import hstu_static_decode
from collectivekv.cachestore.decode.fused_view import may_misalign, misplaced_part
from collectivekv.cachestore.decode.fused_zoo import zoo_static_decode
from collectivekv.cachestore.decode.transfer import unpack_entry
from collectivekv.cachestore.store.entry import entry_from_parquet_row, entry_layout
from collectivekv.model.cache_spec import store_config
from collectivekv.model.config import LONG_ARCHS, CollectiveConfig
from tests.cachestore.decode.test_fused_zoo import N_CAND, VERSION, Case, lengths_of
from tests.model.test_half_cache import OPTIONS, observed
from tests.model.zoo_helpers import N_ITEMS, make_batch, make_model, zoo_config
from tests.zoo_store_fixtures import zoo_prefill_rows

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not fused_available("cpu"), reason="needs Triton's CPU interpreter")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device")]),
]
EXACT = FusedConfig(pool_dtype="float32", block_l=4)  # the model's pool rows exactly


def half_case(arch: str, device: str, option: str = "half", kv_dtype: str = "float32", seed: int = 1,
              mode: str = "collective", **cfg: object) -> Case:
    """A trained-scale model of ``arch`` with ``OPTIONS[option]`` and a batch of lengths_of(cfg) users (HSTU:
    0, 1, 4, the window, longer) + one cold slot of its own prefill records (a ``mode`` store), packed as the
    runtime packs it, on ``device``."""
    config = zoo_config(arch, **OPTIONS[option], **cfg)
    w = config.window_len
    model = observed(make_model(config, seed=seed), make_batch([3, w, 1], w, seed=seed + 1))
    lengths = [0, 1, 4, w, w + 3] if arch == "hstu" else lengths_of(config)
    items, feedback, lens, _ = make_batch(lengths, max(lengths), seed)
    layout = entry_layout(config, VERSION, mode, kv_dtype)
    users = list(range(len(lengths)))
    records = [entry_from_parquet_row(layout, **row) for row in zoo_prefill_rows(model, layout, users, items,
                                                                                  feedback, lens)]
    host = HostBatcher(layout, pin=False).pack([*users, 999], [*records, None])
    zero = torch.zeros(1, items.shape[1], dtype=torch.long)
    hist = (torch.cat([items, zero]), torch.cat([feedback, zero]), torch.cat([lens, torch.zeros(1, dtype=torch.long)]))
    candidates = torch.randint(1, N_ITEMS + 1, (len(users) + 1, N_CAND), generator=torch.Generator().manual_seed(seed))
    return Case(model, ResidentZooModel(copy.deepcopy(model), device), layout, host.tensor.clone().to(device),
                len(users) + 1, hist, candidates)


def fused(case: Case, config: FusedConfig = EXACT, flags: torch.Tensor | None = None) -> torch.Tensor:
    decode = hstu_static_decode if case.model.cfg.arch == "hstu" else zoo_static_decode
    with torch.inference_mode():
        return decode(case.raw, case.candidates.to(case.raw.device), resident=case.resident,
                                 layout=case.layout, n_users=case.n_users, config=config, flags=flags).cpu()


def eager(case: Case) -> torch.Tensor:
    """Every part unpacked and padded (q8 codes × the checkpoint's scales), the model's own decode."""
    with torch.inference_mode():
        batch = unpack_entry(case.raw, case.layout, case.n_users, case.layout.max_len, 16 * case.n_users)
        cache = entry_cache(batch, store_config(case.model.cfg, "collective"), case.resident.dtype,
                            case.resident.scales)
        return decode_zoo(case.resident, cache, case.candidates.to(case.raw.device)).cpu()


def forward(case: Case) -> torch.Tensor:
    """The model's eval forward on the users' histories (the cold slot: an empty history)."""
    with torch.no_grad():
        return case.model(*case.hist, case.candidates)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", [*LONG_ARCHS, "hstu"])
def test_fused_zoo_half_equals_eager_and_forward(arch: str, device: str) -> None:
    case = half_case(arch, device)
    assert case.layout.layout_version == 3 and all(g.int8_user for g in case.layout.groups)
    assert [g.joint for g in case.layout.groups] == [True, arch != "sdim"]  # SDIM's long group is V only
    got = fused(case)
    assert got.shape == (case.n_users, N_CAND) and torch.isfinite(got).all()
    torch.testing.assert_close(got, eager(case), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, forward(case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["sim", "eta", "sdim"])
@pytest.mark.parametrize(("option", "kv_dtype"), [("half", "float32"), ("joint", "float16"), ("int8", "float32")])
def test_fused_keys_of_the_pool_rows(arch: str, option: str, kv_dtype: str, device: str) -> None:
    """SIM / ETA / SDIM with ``retrieval_keys="pool"``: no key part in the store (CR: the K/V parts alone), the fused
    retrieval reads each row's key (SIM: its index block's genre set; ETA: its pool row's SimHash code; SDIM: its
    index block's buckets, and a long V of pool rows alone) through its router index: fused == eager == the eval
    forward. Their full-KV store, with no index left, caches the keys and scores the same."""
    pool = {} if arch == "eta" else {"collective": CollectiveConfig(d_user=2, pool_size=256)}  # blocks of rows
    case = half_case(arch, device, option, kv_dtype, seed=7, retrieval_keys="pool", **pool)
    assert not [p for p in case.layout.parts if p.kind == "key"]
    full = half_case(arch, device, option, kv_dtype, seed=7, retrieval_keys="pool", mode="full", **pool)
    assert [p.name for p in full.layout.parts if p.kind == "key"] == [f"keys.{case.model.key_name}"]
    tol = 1e-5 if kv_dtype == "float32" else 1e-3  # the full store rounds K/V to its dtype
    torch.testing.assert_close(fused(full), forward(full), rtol=tol, atol=tol)
    got = fused(case)
    torch.testing.assert_close(got, eager(case), rtol=1e-5, atol=1e-5)
    if kv_dtype == "float32":
        torch.testing.assert_close(got, forward(case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("arch", "option", "kv_dtype"), [
    ("sim", "joint", "float16"), ("twin", "joint", "float32"), ("eta", "int8", "float16"),
    ("sdim", "int8", "bfloat16"), ("hstu", "joint", "float32"), ("hstu", "int8", "float16"),
])
def test_fused_zoo_joint_index_or_int8_parts_alone(arch: str, option: str, kv_dtype: str, device: str) -> None:
    """A joint index over float user parts, or int8 user parts with separate indices: fused == eager (both read
    the stored parts; pool rows at fp32), with the default launch (pool rows at the store's precision) close."""
    case = half_case(arch, device, option, kv_dtype, seed=3)
    got = fused(case)
    torch.testing.assert_close(got, eager(case), rtol=1e-5, atol=1e-5)
    if kv_dtype == "float32":
        torch.testing.assert_close(got, forward(case), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(case, FusedConfig(block_l=4)), got, rtol=0, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sdim_reads_a_v_index_off_a_2_byte_boundary(device: str) -> None:
    """d_user 1: SDIM's long group is 1 int8 code + a uint16 index per row, so its index part starts at an odd
    byte for an odd n; the bucket kernel reads it byte by byte."""
    case = half_case("sdim", device, collective=CollectiveConfig(d_user=1, pool_size=12), seed=4)
    assert may_misalign(case.layout, "long.v_idx", 2) and not may_misalign(case.layout, "short.kv_idx", 2)
    assert any(n % 2 for n in lengths_of(case.model.cfg))
    got = fused(case)
    torch.testing.assert_close(got, eager(case), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, forward(case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("arch", "part"), [("twin", "long.kv_idx"), ("sim", "short.kv_idx"),
                                            ("hstu", "layer1.kv_idx")])
def test_fused_zoo_flags_a_corrupt_joint_index(arch: str, part: str, device: str) -> None:
    """A joint index outside the pool in a row the decode reads (user 1 has one behaviour) sets that user's flag."""
    lengths = [0, 1, 4, 10, 13] if arch == "hstu" else None
    case = half_case(arch, device, seed=5)
    layout, user = case.layout, 1
    at = int(case.raw[: 8 * case.n_users].view(torch.int64)[user]) + 32
    for p, row_bytes in zip(layout.parts, layout.row_bytes, strict=True):
        if p.name == part:
            break
        at += min((lengths or lengths_of(case.model.cfg))[user], p.cap) * row_bytes
    case.raw[at : at + 2] = torch.tensor([0xFF, 0xFF], dtype=torch.uint8)  # index 65535 > pool (12 rows)
    flags = torch.zeros(case.n_users, dtype=torch.int32, device=case.raw.device)
    assert torch.isfinite(fused(case, flags=flags)).all()
    assert flags.cpu().tolist() == [int(b == user) for b in range(case.n_users)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["eta", "hstu"])
def test_fused_zoo_split_histories_of_a_half_store(arch: str, device: str) -> None:
    """Rows (and retrieved positions) split into parts, one program each, combined after: same logits."""
    case = half_case(arch, device, seed=6)
    got = fused(case, dataclasses.replace(EXACT, block_l=1, split_l=2))
    torch.testing.assert_close(got, eager(case), rtol=1e-5, atol=1e-5)


def test_fused_zoo_refuses_a_part_it_cannot_place() -> None:
    """int8 codes of odd width before a float user part (V shared alone, d_user 1): the short V index and the
    long K part can start off their boundaries, so the fused decode names the part and the eager path."""
    coll = CollectiveConfig(d_user=1, pool_size=12, share_k=False)
    case = half_case("sim", "cpu", "int8", collective=coll, seed=7)
    assert may_misalign(case.layout, "long.k_user", 4) and misplaced_part(case.layout) == "short.v_idx"
    half = half_case("sdim", "cpu", collective=CollectiveConfig(d_user=1, pool_size=12), seed=7).layout
    assert misplaced_part(half) is None  # its odd V index is read byte by byte: the runtime's "auto" fuses it
    with pytest.raises(ValueError, match="short.v_idx .*eager path"):
        fused(case)
