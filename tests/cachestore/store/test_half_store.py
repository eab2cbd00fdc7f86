""""Half the cache" stores (joint K/V index, int8 user parts): the layout (version 3, parts, bytes), the din
engines (memo == direct bitwise, parity with the model) and the executors' per-partition prefill → Parquet →
`ckv store build` → `ckv store verify` → size report for din and the zoo (no Spark)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.entry import EntryLayout, entry_layout, layout_from_dict
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
from collectivekv.cachestore.store.record import LayoutError, write_layout
from collectivekv.jobs.capacity import capacity
from collectivekv.model.cache_spec import compression_rate, entry_bytes
from collectivekv.model.config import CollectiveConfig
from collectivekv.pipeline.prefill.prefill import cache_layout, prefill_batches
from collectivekv.pipeline.reports.capacity_inputs import store_format
from collectivekv.pipeline.reports.size_report import size_report
from collectivekv.pipeline.store.store_ops import build_store
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.model.test_half_cache import HALF, OPTIONS, observed
from tests.model.zoo_helpers import make_batch, make_model, zoo_config
from tests.pipeline.prefill.prefill_helpers import LENGTHS, decoded, histories, reference, run

MV = "0123456789abcdef"


def trained(arch: str, option: str, **kw: object) -> torch.nn.Module:
    """A zoo-sized model of ``arch`` with ``OPTIONS[option]`` whose int8 scales are observed, in eval."""
    cfg = zoo_config(arch, **OPTIONS[option], **kw)
    return observed(make_model(cfg, seed=1), make_batch([3, cfg.window_len, 1], cfg.window_len, seed=2))


def test_layout_is_version_3_exactly_with_new_parts() -> None:
    half = entry_layout(zoo_config("din", **HALF), MV)
    assert half.layout_version == 3 and [p.kind for p in half.parts] == ["q8", "q8", "idx"]
    assert half.flat_group is not None and half.flat_group.joint and half.flat_group.int8_user
    assert half.dtype("q8") == np.int8 and half.record_size(5) == 32 + entry_bytes(zoo_config("din", **HALF), 5)
    assert layout_from_dict(half.to_dict()) == half
    assert entry_layout(zoo_config("din"), MV).layout_version == 2
    assert entry_layout(zoo_config("din", **HALF), MV, "full").layout_version == 2
    with pytest.raises(LayoutError, match="layout_version must be 3"):
        EntryLayout.from_dict({**half.to_dict(), "layout_version": 2})
    sdim = entry_layout(zoo_config("sdim", **HALF), MV)
    assert [g.joint for g in sdim.groups] == [True, False] and all(g.int8_user for g in sdim.groups)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_din_memo_equals_direct_and_records_hold_the_codes(option: str) -> None:
    model = trained("din", option, max_len=8)
    layout = cache_layout(model.cfg, MV)
    batch = histories(LENGTHS)
    memo, direct = run(model, layout, batch, "memo", 5), run(model, layout, batch, "direct", 5)
    assert memo.column("payload").to_pylist() == direct.column("payload").to_pylist()
    recs = decoded(direct, layout)
    g = layout.flat_group
    _, _, w, cache = reference(model, batch)
    for b, uid in enumerate(batch.column("user_id").to_pylist()):
        n = int(w[b])
        for side in "kv":
            stored = torch.from_numpy(recs[uid].arrays[f"kv.{side}_user"].copy())
            want = getattr(cache, f"{side}_user")[b, :n]
            if g.user_kind(side) == "q8":
                assert stored.dtype == torch.int8
                stored = stored.float() * getattr(model, f"{side}_branch").user_scale
            torch.testing.assert_close(stored.float(), want.float(), rtol=2 * 2.0**-10, atol=1e-6)
        if g.joint:
            assert np.array_equal(recs[uid].arrays["kv.kv_idx"].ravel(), cache.k_idx[b, :n].numpy())


@pytest.mark.parametrize(("arch", "option", "extra"), [
    ("din", "half", {}), ("sim", "half", {}), ("sdim", "half", {}), ("hstu", "half", {}), ("twin", "joint", {}),
    ("eta", "int8", {}), ("eta", "half", {"retrieval_keys": "pool"}),
    ("sim", "half", {"retrieval_keys": "pool", "collective": CollectiveConfig(d_user=2, pool_size=256)}),
    ("sdim", "half", {"retrieval_keys": "pool", "collective": CollectiveConfig(d_user=2, pool_size=256)}),
])
def test_prefill_build_verify_and_size_report(tmp_path: Path, arch: str, option: str, extra: dict) -> None:
    """The executors' per-partition function → Parquet → store build → verify (every record against the model's
    own K/V, indices exactly) → the size report's CR from model.cache_spec (SIM / ETA / SDIM keyed by their router
    indices: no key)."""
    model = trained(arch, option, **extra)
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    layout = cache_layout(model.cfg, version)
    table = histories(LENGTHS, seed=3)
    table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
    out = pa.Table.from_batches(list(prefill_batches(table.to_batches(max_chunksize=8), model, layout, 5)))
    pdir = tmp_path / "parquet"
    pdir.mkdir()
    pq.write_table(out, pdir / "part-0.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    prefill = {"model_config": dataclasses.asdict(model.cfg), "mode": "collective"}
    m = build_store(tmp_path / "store", pdir, prefill=prefill, command_line="test")
    assert m["users"] == len(LENGTHS)
    assert m["k_shared"] and m["v_shared"]  # a joint index shares both sides
    hist = tmp_path / "h.parquet"
    pq.write_table(table, hist)
    res = verify_store(tmp_path / "store", tmp_path / "ckpt", hist)
    assert res.ok and res.users_checked == len(LENGTHS), res.mismatches
    users = table.column("user_id").to_numpy()
    scores = {}
    for crc in (False, True):  # `ckv score` checks CRCs and indices by default: a valid record passes
        with DecodeRuntime.open(tmp_path / "store", tmp_path / "ckpt", device="cpu", verify_crc=crc) as rt:
            scores[crc] = rt.score(users, np.ones(len(users), dtype=np.int64)).logits
    np.testing.assert_array_equal(scores[True], scores[False])
    rep = size_report(tmp_path / "store")["store"]
    assert rep["cr"]["formula"] == pytest.approx(compression_rate(model.cfg, kv_itemsize=2))
    planned = store_format(tmp_path / "store").layouts()["collective"]  # `ckv capacity --store` sizes these records
    assert dataclasses.replace(planned, model_version=layout.model_version) == layout
    if rep["token_table"]["applies"]:  # the planner's token-table CR over the store's lengths is the store's
        res = CliRunner().invoke(capacity, ["--store", str(tmp_path / "store"), "--items", str(model.cfg.n_items),
                                            "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["token_table"]["cr"] == pytest.approx(rep["token_table"]["cr"], rel=1e-3)


def test_verify_catches_a_different_scale(tmp_path: Path) -> None:
    model = trained("din", "half", max_len=8)
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    layout = cache_layout(model.cfg, version)
    batch = histories(LENGTHS, seed=4)
    pdir = tmp_path / "parquet"
    pdir.mkdir()
    pq.write_table(pa.Table.from_batches(list(prefill_batches([batch], model, layout))), pdir / "part-0.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    build_store(tmp_path / "store", pdir)
    hist = tmp_path / "h.parquet"
    pq.write_table(pa.Table.from_batches([batch]), hist)
    assert verify_store(tmp_path / "store", tmp_path / "ckpt", hist).ok
    with torch.no_grad():
        model.k_branch.user_scale.mul_(1.5)  # the checkpoint's scale is part of the model: a new version
    save_checkpoint(tmp_path / "ckpt2", model, {})
    res = verify_store(tmp_path / "store", tmp_path / "ckpt2", hist)
    assert not res.ok and any("store was built by model" in m for m in res.mismatches), res.mismatches
