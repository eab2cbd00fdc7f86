"""The per-partition prefill function (no Spark), the store build/verify/report on its output."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.decode.entry_batch import model_tensors, stack_records
from collectivekv.cachestore.store.entry import decode_entry, entry_from_parquet_row
from collectivekv.cachestore.store.lmdb_build import prefill_schema
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import write_layout
from collectivekv.model.cache import KVCache
from collectivekv.model.cache_spec import bytes_per_behaviour, compression_rate, store_config
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.ctr import TargetAttentionCTR
from collectivekv.model.entry import cache_from_arrays
from collectivekv.pipeline.data.history import arrow_window
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
from collectivekv.pipeline.reports.size_report import size_report
from collectivekv.pipeline.store.store_ops import build_store
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint

N_ITEMS = 40
MV = "0123456789abcdef"


def small_config(**kw: object) -> ModelConfig:
    base = ModelConfig(n_items=N_ITEMS, n_genres=5, max_genres=3, embed_dim=16, d_attn=32, n_heads=4, max_len=8,
                       mlp_dims=(16,), collective=CollectiveConfig(d_user=2, pool_size=12))
    return dataclasses.replace(base, **kw)


def make_model(cfg: ModelConfig, seed: int = 0) -> TargetAttentionCTR:
    g = torch.Generator().manual_seed(seed)
    genres = torch.randint(0, cfg.n_genres + 1, (cfg.n_items + 1, cfg.max_genres), generator=g)
    genres[0] = 0
    torch.manual_seed(seed)
    return TargetAttentionCTR(cfg, genres).eval()


def histories(lengths: list[int], seed: int = 0, first_user: int = 100, n_items: int = N_ITEMS) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    items = [rng.integers(1, n_items + 1, n).astype(np.int32).tolist() for n in lengths]
    labels = [rng.integers(0, 2, n).astype(np.int8).tolist() for n in lengths]
    ts = [list(range(n)) for n in lengths]
    return pa.RecordBatch.from_arrays(
        [pa.array(np.arange(first_user, first_user + len(lengths), dtype=np.int64)),
         pa.array(items, pa.list_(pa.int32())), pa.array(ts, pa.list_(pa.int64())),
         pa.array(labels, pa.list_(pa.int8()))],
        names=["user_id", "items", "timestamps", "labels"])


LENGTHS = [0, 1, 2, 5, 8, 9, 20, 3, 0, 1, 13, 7]


def run(model, layout, batch, engine="auto", batch_users=0) -> pa.Table:
    eng = make_engine(model, layout, engine)
    return pa.Table.from_batches(list(prefill_batches([batch], eng, layout, batch_users)), schema=OUTPUT_SCHEMA)


def decoded(table: pa.Table, layout) -> dict[int, object]:
    """Each output row through the store's own checks (checksum, sizes, model version) and decoder."""
    out = {}
    for row in table.to_pylist():
        rec = entry_from_parquet_row(layout, **row)
        out[row["user_id"]] = decode_entry(layout, rec, expected_model_version=layout.model_version)
    return out


def rebuilt(model, layout, records: list, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V (B, width, d_a) rebuilt from records with the model's pools (model.keys_values on the stored
    parts, as fp32: the din group of model.entry.cache_from_arrays)."""
    lengths, stacked = stack_records(layout, records)
    tensors = {k: t.float() if t.is_floating_point() else t for k, t in model_tensors(layout, stacked).items()}
    cache = cache_from_arrays(tensors, torch.from_numpy(lengths), store_config(model.cfg, layout.mode)).kv["kv"]
    k, v = model.keys_values(cache)  # (B, R, d_a), R = the longest record
    pad = (0, 0, 0, width - k.shape[1])
    return torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)


def reference(model, batch: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
    w = arrow_window(batch.column("items"), batch.column("labels"), model.cfg.max_len)
    with torch.inference_mode():
        cache = model.prefill(torch.from_numpy(w.items), torch.from_numpy(w.feedback), torch.from_numpy(w.lengths))
        k, v = model.keys_values(cache)
    return k, v, torch.from_numpy(w.lengths), cache


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


# ------------------------------------------------------------ store build / verify / report (no Spark)
def write_prefill(tmp: Path, model, layout, batches: list[pa.RecordBatch]) -> Path:
    out = tmp / "prefill"
    out.mkdir()
    for i, b in enumerate(batches):
        pq.write_table(pa.Table.from_batches(list(prefill_batches([b], model, layout))), out / f"part-{i}.parquet")
    write_layout(out / "_layout.json", layout)
    return out


@pytest.fixture()
def small_store(tmp_path: Path) -> dict:
    model = make_model(small_config(max_len=6))
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    layout = cache_layout(model.cfg, version)
    parts = [histories(LENGTHS, seed=7, first_user=0), histories(LENGTHS[:5], seed=8, first_user=50)]
    hist = tmp_path / "hist"
    hist.mkdir()
    for i, b in enumerate(parts):
        pq.write_table(pa.Table.from_batches([b]), hist / f"h{i}.parquet")
    prefill = {"model_config": dataclasses.asdict(model.cfg), "mode": "collective"}
    manifest = build_store(tmp_path / "store", write_prefill(tmp_path, model, layout, parts), prefill=prefill,
                           command_line="test")
    return {"root": tmp_path, "store": tmp_path / "store", "ckpt": tmp_path / "ckpt", "hist": hist,
            "manifest": manifest, "model": model, "layout": layout, "parts": parts}


def test_build_store_manifest_and_links(small_store: dict) -> None:
    store, m = small_store["store"], small_store["manifest"]
    for key in ("model_version", "dims", "dtypes", "pool_size", "users", "bytes", "created_at", "command_line"):
        assert key in m
    assert m["users"] == len(LENGTHS) + 5
    assert m["dims"]["d_attn"] == 32 and m["dtypes"] == {"kv": "float16", "index": "uint16"}
    assert set(m["bytes"]) >= {"parquet", "lmdb_disk", "payload"}
    assert json.loads((store / "manifest.json").read_text())["version_id"] == m["version_id"]
    assert (store / "lmdb" / "data.mdb").is_file() and (store / "layout.json").is_file()
    assert sorted(p.name for p in (store / "parquet").iterdir()) == [
        "_layout.json", "_prefill.json", "part-0.parquet", "part-1.parquet"]


def test_verify_passes_and_catches_mismatches(small_store: dict, tmp_path: Path) -> None:
    s = small_store
    res = verify_store(s["store"], s["ckpt"], s["hist"])
    assert res.ok, res.mismatches
    assert res.users_checked == len(LENGTHS) + 5
    assert verify_store(s["store"], s["ckpt"], s["hist"], sample=4).users_checked == 4
    # the histories of other users: the records differ from what the model computes
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pa.Table.from_batches([histories(LENGTHS, seed=99, first_user=0),
                                          histories(LENGTHS[:5], seed=8, first_user=50)]), wrong / "h.parquet")
    res = verify_store(s["store"], s["ckpt"], wrong)
    assert not res.ok and any("differs" in m or "length" in m or "idx" in m for m in res.mismatches)
    # a user missing from the store, and a different model
    pq.write_table(pa.Table.from_batches([histories([2], first_user=999)]), wrong / "h2.parquet")
    assert any("no record" in m for m in verify_store(s["store"], s["ckpt"], wrong).mismatches)
    other = tmp_path / "other"
    save_checkpoint(other, make_model(small_config(max_len=6), seed=1), {})
    runner = CliRunner()
    r = runner.invoke(__import__("collectivekv.jobs.store", fromlist=["store"]).store,
                      ["verify", str(s["store"]), "--checkpoint", str(other), "--histories", str(s["hist"])])
    assert r.exit_code == 1 and "store was built by model" in r.output
    r = runner.invoke(__import__("collectivekv.jobs.store", fromlist=["store"]).store,
                      ["verify", str(s["store"]), "--checkpoint", str(s["ckpt"]), "--histories", str(s["hist"])])
    assert r.exit_code == 0 and "OK" in r.output


def test_size_report_cr(small_store: dict) -> None:
    rep = size_report(small_store["store"])["store"]
    cfg = small_store["model"].cfg
    assert rep["cr"]["formula"] == pytest.approx(compression_rate(cfg, 2))
    assert rep["cr"]["payload"] == pytest.approx(compression_rate(cfg, 2))
    assert rep["cr"]["lmdb_disk"] > rep["cr"]["records"] > rep["cr"]["payload"]
    behaviours = sum(min(n, 6) for n in LENGTHS + LENGTHS[:5])
    assert rep["behaviours"] == behaviours
    assert rep["bytes"]["payload"] == behaviours * bytes_per_behaviour(cfg, 2)


def test_store_reader_sees_prefill_records(small_store: dict) -> None:
    with StoreReader.open_current(small_store["store"]) as reader:
        assert len(reader) == len(LENGTHS) + 5
        rec = reader.get(4)
        assert rec is not None and rec.length == 6 and rec.arrays["kv.k_user"].shape == (6, 2)


def test_store_build_cli_from_a_parquet_dir(small_store: dict, tmp_path: Path) -> None:
    from collectivekv.jobs.store import store as store_cli

    src = small_store["store"] / "parquet"
    runner = CliRunner()
    r = runner.invoke(store_cli, ["build", str(src), "--no-progress"])
    assert r.exit_code == 2 and "--store" in r.output
    new = tmp_path / "copy"
    r = runner.invoke(store_cli, ["build", str(src), "--store", str(new), "--no-progress"])
    assert r.exit_code == 0, r.output
    with StoreReader.open_current(new) as a, StoreReader.open_current(small_store["store"]) as b:
        assert [a.get_raw(u) for u in b.iter_users()] == [b.get_raw(u) for u in b.iter_users()]
    assert json.loads((new / "manifest.json").read_text())["dims"]["d_attn"] == 32  # _prefill.json kept
    r = runner.invoke(store_cli, ["build", str(tmp_path), "--no-progress"])
    assert r.exit_code == 1 and "neither a prefill Parquet directory" in r.output


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
