"""The per-partition prefill function (no Spark): its rows against the model's own K/V for every kv dtype, engine,
store mode, sharing and index width; memo = direct bit for bit, chunking and reruns change nothing, the engine
choice, checksums, and inputs or models it refuses. (The store built from its output: test_prefill_store.py.)"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from collectivekv.cachestore.decode.entry_batch import model_tensors, stack_records
from collectivekv.cachestore.store.lmdb_build import prefill_schema
from collectivekv.model.cache_spec import bytes_per_behaviour, compression_rate, store_config
from collectivekv.model.config import CollectiveConfig
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.entry import cache_from_arrays
from collectivekv.pipeline.prefill.prefill import (
    OUTPUT_SCHEMA,
    DirectEngine,
    MemoEngine,
    NoopEngine,
    PrefillInputError,
    cache_layout,
    make_engine,
    prefill_batches,
    tokenwise,
)
from tests.pipeline.prefill.prefill_helpers import (
    LENGTHS,
    MV,
    N_ITEMS,
    decoded,
    histories,
    make_model,
    reference,
    run,
    small_config,
)


def rebuilt(model, layout, records: list, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V (B, width, d_a) rebuilt from records with the model's pools (model.keys_values on the stored
    parts, as fp32: the din group of model.entry.cache_from_arrays)."""
    lengths, stacked = stack_records(layout, records)
    tensors = {k: t.float() if t.is_floating_point() else t for k, t in model_tensors(layout, stacked).items()}
    cache = cache_from_arrays(tensors, torch.from_numpy(lengths), store_config(model.cfg, layout.mode)).kv["kv"]
    k, v = model.keys_values(cache)  # (B, R, d_a), R = the longest record
    pad = (0, 0, 0, width - k.shape[1])
    return torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)


TOL = {"float16": 2 * 2.0**-10, "bfloat16": 2 * 2.0**-7, "float32": 1e-6}


def assert_parity(model, layout, table: pa.Table, batch: pa.RecordBatch) -> None:
    k_ref, v_ref, lengths, cache = reference(model, batch)
    recs = decoded(table, layout)
    users = batch.column("user_id").to_pylist()
    assert list(recs) == users  # one row per user, input order
    assert [recs[u].length for u in users] == lengths.tolist()
    k, v = rebuilt(model, layout, [recs[u] for u in users], model.cfg.max_len)
    valid = torch.arange(model.cfg.max_len)[None, :] < lengths[:, None]
    tol = TOL[layout.kv_dtype]
    torch.testing.assert_close(k[valid], k_ref[valid], rtol=tol, atol=1e-5)
    torch.testing.assert_close(v[valid], v_ref[valid], rtol=tol, atol=1e-5)
    if layout.mode == "collective":
        for name in ("k_idx", "v_idx"):
            if getattr(layout.flat_group, f"{name[0]}_shared"):
                stored = torch.cat([torch.from_numpy(recs[u].arrays[f"kv.{name}"].ravel().astype(np.int64))
                                    for u in users])  # fmt: skip
                assert torch.equal(stored, getattr(cache, name)[valid])


def test_output_schema_is_the_store_schema() -> None:
    assert prefill_schema() == OUTPUT_SCHEMA


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("engine", ["memo", "direct"])
def test_collective_parity_with_model(kv_dtype: str, engine: str) -> None:
    model = make_model(small_config())
    layout = cache_layout(model.cfg, MV, "collective", kv_dtype)
    batch = histories(LENGTHS)
    table = run(model, layout, batch, engine, batch_users=5)
    assert table.schema == prefill_schema()
    assert table.column("length").to_pylist() == [min(n, 8) for n in LENGTHS]
    assert set(table.column("model_version").to_pylist()) == {MV}
    assert_parity(model, layout, table, batch)


@pytest.mark.parametrize("cfg_kw", [{}, {"kv_mode": "full"}])
def test_full_mode_stores_whole_kv(cfg_kw: dict) -> None:
    model = make_model(small_config(**cfg_kw))
    layout = cache_layout(model.cfg, MV, "full")
    g = layout.flat_group
    assert (g.dk, g.dv, g.k_shared, g.v_shared, layout.idx_dtype, layout.pool_size) == (32, 32, False, False, None, 0)
    batch = histories(LENGTHS, seed=1)
    for engine in ("memo", "direct"):
        table = run(model, layout, batch, engine)
        assert [len(x) for x in table.column("payload").to_pylist()] == [min(n, 8) * 2 * 32 * 2 for n in LENGTHS]
        assert_parity(model, layout, table, batch)


def test_full_kv_checkpoint_has_no_collective_cache() -> None:
    with pytest.raises(ValueError, match="full-KV model"):
        cache_layout(small_config(kv_mode="full"), MV, "collective")


@pytest.mark.parametrize("share", [(True, False), (False, True)])
def test_partial_sharing(share: tuple[bool, bool]) -> None:
    cfg = small_config(collective=CollectiveConfig(d_user=2, pool_size=12, share_k=share[0], share_v=share[1]))
    model = make_model(cfg)
    layout = cache_layout(cfg, MV)
    assert (layout.flat_group.dk, layout.flat_group.dv) == ((2, 32) if share[0] else (32, 2))
    batch = histories(LENGTHS, seed=2)
    assert_parity(model, layout, run(model, layout, batch, "memo"), batch)


def test_index_width_follows_pool_size() -> None:
    assert cache_layout(small_config(), MV).idx_dtype == "uint16"
    cfg = small_config(collective=CollectiveConfig(d_user=1, pool_size=65_536))
    assert cache_layout(cfg, MV).idx_dtype == "uint16"
    cfg = small_config(embed_dim=4, collective=CollectiveConfig(d_user=1, pool_size=70_000))
    model = make_model(cfg)
    layout = cache_layout(cfg, MV)
    assert layout.idx_dtype == "int32"
    batch = histories([3, 0, 5], seed=3)
    table = run(model, layout, batch)
    assert [len(x) for x in table.column("payload").to_pylist()] == [3 * 12, 0, 5 * 12]  # (1 + 1) * 2 + 2 * 4
    assert decoded(table, layout)[100].arrays["kv.k_idx"].dtype == np.int32
    assert_parity(model, layout, table, batch)


def test_layout_bytes_match_the_model_cr() -> None:
    for cfg in (small_config(), small_config(collective=CollectiveConfig(d_user=1, pool_size=10_000))):
        layout = cache_layout(cfg, MV)
        per = layout.record_size(1) - layout.record_size(0)
        assert per == bytes_per_behaviour(cfg, 2)
        assert per / (2 * cfg.d_attn * 4) == pytest.approx(compression_rate(cfg, 2))


def test_memo_equals_direct_bitwise_and_survives_resets() -> None:
    model = make_model(small_config())
    layout = cache_layout(model.cfg, MV)
    batch = histories(LENGTHS * 4, seed=4)
    direct = run(model, layout, batch, "direct")
    memo = run(model, layout, batch, "memo", batch_users=7)
    assert memo.equals(direct)
    tiny = MemoEngine(model, layout, memo_bytes=1)  # capacity floor 4096 entries
    tiny.capacity = 10  # force resets (and the no-memo path for chunks with > 10 behaviours)
    again = pa.Table.from_batches(list(prefill_batches([batch], tiny, layout, 2)))
    assert tiny.resets > 0
    assert again.equals(direct)


def test_rerun_and_chunking_give_identical_rows() -> None:
    model = make_model(small_config())
    layout = cache_layout(model.cfg, MV)
    batch = histories(LENGTHS * 3, seed=5)
    a = run(model, layout, batch, "auto", batch_users=4)
    b = pa.Table.from_batches(list(prefill_batches([batch.slice(0, 10), batch.slice(10)], model, layout, 100)))
    assert a.equals(b)
    assert a.equals(run(model, layout, batch, "auto", batch_users=4))


def test_auto_engine_falls_back_when_not_tokenwise() -> None:
    class Positional(TargetAttentionCTR):
        def prefill(self, items, feedback, lengths):  # K depends on the position: not token-wise
            c = super().prefill(items, feedback, lengths)
            pos = torch.arange(items.shape[1], dtype=c.k_user.dtype)[None, :, None]
            return dataclasses.replace(c, k_user=c.k_user + pos)

    cfg = small_config()
    model = Positional(cfg).eval()
    layout = cache_layout(cfg, MV)
    assert tokenwise(make_model(cfg), layout)
    assert not tokenwise(model, layout)
    assert isinstance(make_engine(model, layout), DirectEngine)
    assert isinstance(make_engine(make_model(cfg), layout), MemoEngine)


def test_noop_engine_sizes_and_checksums() -> None:
    model = make_model(small_config())
    layout = cache_layout(model.cfg, MV)
    batch = histories(LENGTHS, seed=6)
    real = run(model, layout, batch)
    noop = pa.Table.from_batches(list(prefill_batches([batch], NoopEngine(layout), layout)))
    for col in ("user_id", "length", "model_version"):
        assert noop.column(col).equals(real.column(col))
    assert [len(x) for x in noop.column("payload").to_pylist()] == [len(x) for x in real.column("payload").to_pylist()]
    decoded(noop, layout)  # checksums and sizes valid


def test_checksum_is_crc_of_the_payload() -> None:
    model = make_model(small_config())
    layout = cache_layout(model.cfg, MV)
    for row in run(model, layout, histories([4, 0, 9])).to_pylist():
        assert row["checksum"] == zlib.crc32(row["payload"])
        assert len(row["payload"]) == row["length"] * (2 * 2 + 2 * 2 + 2 + 2)  # k_user | v_user | k_idx | v_idx


def test_bad_input_is_named() -> None:
    model = make_model(small_config())
    layout = cache_layout(model.cfg, MV)
    batch = histories([3, 2])
    with pytest.raises(PrefillInputError, match="no column 'labels'"):
        list(prefill_batches([batch.drop_columns(["labels"])], model, layout))
    bad_type = batch.set_column(1, "items", pa.array(["a", "b"]))
    with pytest.raises(PrefillInputError, match="'items' has type string"):
        list(prefill_batches([bad_type], model, layout))
    with pytest.raises(PrefillInputError, match=r"user 101: item 99"):
        list(prefill_batches([histories([3, 2], n_items=N_ITEMS).set_column(
            1, "items", pa.array([[1, 2, 3], [4, 99]], pa.list_(pa.int32())))], model, layout))
    nulls = batch.set_column(3, "labels", pa.array([[0, 1, 1], None], pa.list_(pa.int8())))
    with pytest.raises(PrefillInputError, match="user 101: null 'labels'"):
        list(prefill_batches([nulls], model, layout))


def test_model_must_match_layout() -> None:
    model = make_model(small_config())
    other = cache_layout(small_config(collective=CollectiveConfig(d_user=3, pool_size=12)), MV)
    with pytest.raises(ValueError, match="does not fit"):
        make_engine(model, other, "direct")
    with pytest.raises(ValueError, match="eval mode"):
        make_engine(make_model(small_config()).train(), cache_layout(model.cfg, MV), "direct")


def test_memo_blocks_shared_through_a_directory(tmp_path: Path) -> None:
    from collectivekv.pipeline.prefill.block_cache import SharedBlocks

    model = make_model(small_config(n_items=300))
    layout = cache_layout(model.cfg, MV)
    batch = histories(LENGTHS * 3, seed=10, n_items=300)
    alone = run(model, layout, batch, "memo")
    first = MemoEngine(model, layout, block_dir=tmp_path)
    a = pa.Table.from_batches(list(prefill_batches([batch], first, layout)))
    second = MemoEngine(model, layout, block_dir=tmp_path)
    b = pa.Table.from_batches(list(prefill_batches([batch], second, layout)))
    assert a.equals(alone) and b.equals(alone)
    assert first.shared.computed > 0 and first.shared.loaded == 0
    assert second.shared.computed == 0 and second.shared.loaded == first.shared.computed
    # a lock left by a dead process is taken over; a live lock is waited for, then ignored after wait_s
    shared = SharedBlocks(tmp_path / "locks", wait_s=0.2)
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (shared.root / "block-0.lock").write_text(f"{socket.gethostname()} {dead.pid}")
    (shared.root / "block-1.lock").write_text("another-host 1")
    got = dict(shared.fetch([0, 1], lambda b: {"tok": np.array([b])}))
    assert sorted(got) == [0, 1] and shared.computed == 2


def test_zoo_archs_refuse_the_memo_engine() -> None:
    from collectivekv.cachestore.store.entry import EntryLayout
    from collectivekv.pipeline.prefill.prefill import check_engine

    layout = cache_layout(small_config(arch="hstu"), MV)  # several cache groups
    assert isinstance(layout, EntryLayout) and layout.arch == "hstu"
    with pytest.raises(ValueError, match="engine 'memo' needs the din arch"):
        check_engine(layout, "memo")
