""""Half the cache" stores (joint K/V index, int8 user parts) through the serving decodes: din's fused Triton
kernel (under TRITON_INTERPRET=1 on CPU) == the eager unpack + decode (gather and poolscore) on random records,
and on the records the prefill writes == the model's own eval forward; a zoo half store's eager and fused decodes
of the prefill's records == the eval forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import ResidentModel
from collectivekv.cachestore.decode.entry_batch import kv_storage
from collectivekv.cachestore.decode.fused import FusedConfig, fused_available, fused_decode
from collectivekv.cachestore.store.entry import EntryLayout, encode_entry, entry_from_parquet_row, entry_layout
from collectivekv.pipeline.data.history import arrow_window
from tests.cachestore.decode.test_graphs import eager_logits
from tests.model.test_half_cache import OPTIONS, observed
from tests.model.test_model import N_ITEMS, make_batch, make_model, small_config
from tests.pipeline.prefill.prefill_helpers import LENGTHS, histories, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
EXACT = FusedConfig(pool_dtype="float32", block_l=2)
MV = "0123456789abcdef"


def resident_of(option: str, seed: int = 1) -> ResidentModel:
    cfg = small_config(**OPTIONS[option])
    model = observed(make_model(cfg, seed=seed), make_batch(4, cfg.max_len, seed=seed, min_len=1))
    return ResidentModel(model, DEVICE)


def random_records(layout: EntryLayout, lengths: list[int | None], rng: np.random.Generator) -> list[bytes | None]:
    """Records of random parts of any kind (N(0,1) floats, int8 codes, pool indices); None = cold start."""
    out: list[bytes | None] = []
    for n in lengths:
        if n is None:
            out.append(None)
            continue
        parts = []
        for p in layout.parts:
            if p.kind == "kv":
                parts.append(kv_storage(torch.from_numpy(rng.standard_normal((n, p.width)).astype(np.float32)),
                                        layout.kv_dtype))  # fmt: skip
            elif p.kind == "q8":
                parts.append(rng.integers(-127, 128, (n, p.width)).astype(np.int8))
            else:
                parts.append(rng.integers(0, layout.pool_size, (n, 1)).astype(layout.dtype("idx")))
        out.append(encode_entry(layout, n, parts))
    return out


def packed(layout: EntryLayout, records: list[bytes | None]) -> tuple[object, torch.Tensor]:
    host = HostBatcher(layout, pin=False).pack(np.arange(len(records)), records)
    return host, host.tensor.clone().to(DEVICE)


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize(("kv_dtype", "idx_dtype"), [("float32", "uint16"), ("float16", "int32"),
                                                     ("bfloat16", "uint16")])  # fmt: skip
def test_fused_equals_eager_on_random_records(option: str, kv_dtype: str, idx_dtype: str) -> None:
    resident = resident_of(option)
    layout = dataclasses.replace(entry_layout(resident.cfg, MV, "collective", kv_dtype), idx_dtype=idx_dtype)
    assert layout.layout_version == 3
    rng = np.random.default_rng(5)
    lengths = [0, 1, resident.cfg.max_len, None, 3, 5]
    host, raw = packed(layout, random_records(layout, lengths, rng))
    cand = torch.from_numpy(rng.integers(0, N_ITEMS + 1, (len(lengths), 3))).to(DEVICE)
    with torch.inference_mode():
        got = fused_decode(resident, raw, layout, len(lengths), cand, config=EXACT)
        for path in ("gather", "poolscore"):
            want = eager_logits(resident, host, cand, path)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        split = fused_decode(resident, raw, layout, len(lengths), cand, config=dataclasses.replace(EXACT, split_l=2))
    torch.testing.assert_close(split, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_served_scores_equal_the_eval_forward(option: str) -> None:
    """prefill (direct engine, fp32 store) → records → fused and eager decode == model(history, candidates)."""
    resident = resident_of(option, seed=2)
    model, cfg = resident.model, resident.cfg
    layout = entry_layout(cfg, MV, "collective", "float32")
    batch = histories(LENGTHS)
    table = run(model.cpu(), layout, batch, "direct")
    model.to(DEVICE)
    records = [entry_from_parquet_row(layout, **row) for row in table.to_pylist()]
    host, raw = packed(layout, records)
    w = arrow_window(batch.column("items"), batch.column("labels"), cfg.max_len)
    rng = np.random.default_rng(6)
    cand = torch.from_numpy(rng.integers(1, N_ITEMS + 1, (len(LENGTHS), 2))).to(DEVICE)
    with torch.inference_mode():
        want, _ = model(*(torch.from_numpy(a).to(DEVICE) for a in (w.items, w.feedback, w.lengths)), cand)
        fused = fused_decode(resident, raw, layout, len(LENGTHS), cand, config=EXACT)
        eager = eager_logits(resident, host, cand, "gather")
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["sim", "sdim", "hstu"])
def test_zoo_eager_and_fused_decode_of_half_records_equal_forward(arch: str) -> None:
    """A zoo half store from the prefill job: unpack + entry_cache (codes × the checkpoint's scales) + the model's
    decode == forward, and so does the zoo's fused body of the serving graph (joint index, int8 codes read in
    place: tests/cachestore/decode/test_fused_zoo_half.py has the per-model cases)."""
    from collectivekv.cachestore.decode.decode import ResidentZooModel, decode_zoo, entry_cache
    from collectivekv.cachestore.decode.static_decode import static_decode
    from collectivekv.cachestore.decode.transfer import unpack_entry
    from tests.cachestore.store.test_half_store import trained

    model = trained(arch, "half")
    resident = ResidentZooModel(model, DEVICE)
    layout = entry_layout(model.cfg, MV, "collective", "float32")
    batch = histories(LENGTHS[:8], seed=9)
    records = [entry_from_parquet_row(layout, **row) for row in run(model, layout, batch, "direct").to_pylist()]
    host, raw = packed(layout, records)
    w = arrow_window(batch.column("items"), batch.column("labels"), model.cfg.window_len)
    cand = torch.from_numpy(np.random.default_rng(7).integers(1, N_ITEMS + 1, (8, 2))).to(DEVICE)
    with torch.inference_mode():
        want, _ = model(*(torch.from_numpy(a).to(DEVICE) for a in (w.items, w.feedback, w.lengths)), cand)
        arrays = unpack_entry(raw, layout, 8, max(1, int(w.lengths.max())), host.zero_offset)
        got = decode_zoo(resident, entry_cache(arrays, model.cfg, resident.dtype, resident.scales), cand)
        fused = static_decode(raw, cand, resident=resident, layout=layout, n_users=8, pad_to=model.cfg.window_len,
                              path="fused", fused=EXACT)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
