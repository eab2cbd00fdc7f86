"""Serving path of din stores: batched store reads, the decode entry point (poolscore vs gather) and the resident
model's item table, the decode runtime against the training model, refusals of another model version or arch,
reads after fork, and `ckv score`. (Host pack → device copy → unpack: test_pack_unpack.py.)"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import ResidentModel, decode
from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.entry import encode_entry
from collectivekv.cachestore.store.publish import LAYOUT, LMDB_DIR, open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import (
    LayoutError,
    ModelVersionMismatchError,
    RecordError,
    user_key,
    write_layout,
)
from collectivekv.jobs.score import score as score_cmd
from collectivekv.model.cache import KVCache
from collectivekv.model.config import CollectiveConfig
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.cachestore.decode.serving_helpers import SEQ, VERSION, histories
from tests.model.test_model import N_ITEMS, make_model, small_config
from tests.store_fixtures import layout_for, store_of_model

# name -> (model config overrides, store mode)
VARIANTS = {
    "full": (dict(kv_mode="full"), "full"),
    "collective": (dict(kv_mode="collective"), "collective"),
    "share_k_only": (dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_v=False)), "collective"),
    "share_v_only": (dict(collective=CollectiveConfig(d_user=2, pool_size=12, share_k=False)), "collective"),
    "collective_model_full_store": (dict(kv_mode="collective"), "full"),
}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float16": dict(rtol=3e-3, atol=3e-3)}


def forward_logits(model, items, feedback, lengths, cand: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(items, feedback, lengths, torch.from_numpy(cand))[0].numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One store per (variant, kv dtype): users 100..111 prefilled; the model and the histories."""
    out = {}
    items, feedback, lengths = histories(12, seed=3)
    for name, (overrides, mode) in VARIANTS.items():
        model = make_model(small_config(**overrides), seed=1).eval()
        for kv_dtype in ("float32", "float16"):
            root = tmp_path_factory.mktemp(f"{name}-{kv_dtype}")
            store_of_model(root, model, VERSION, list(range(100, 112)), items, feedback, lengths, mode, kv_dtype)
            out[name, kv_dtype] = (model, root)
    return {"stores": out, "items": items, "feedback": feedback, "lengths": lengths}


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_runtime_scores_equal_model_forward(served: dict, variant: str, kv_dtype: str) -> None:
    model, root = served["stores"][variant, kv_dtype]
    items, feedback, lengths = served["items"], served["feedback"], served["lengths"]
    # requests: every stored user, a repeated one and two users the store does not hold (cold start)
    order = [105, 100, 101, 102, 111, 7, 103, 104, 100, 106, 107, 108, 109, 110, 99999]
    rows = [u - 100 if u >= 100 and u < 112 else None for u in order]
    g = np.random.default_rng(0)
    cand = g.integers(1, N_ITEMS + 1, (len(order), 3))
    n_cand = g.integers(1, 4, len(order))
    zero = torch.zeros(1, SEQ, dtype=torch.long)
    it = torch.cat([items[r : r + 1] if r is not None else zero for r in rows])
    fb = torch.cat([feedback[r : r + 1] if r is not None else zero for r in rows])
    ln = torch.tensor([int(lengths[r]) if r is not None else 0 for r in rows])
    want = forward_logits(model, it, fb, ln, cand)
    real = np.arange(3)[None, :] < n_cand[:, None]
    reader = StoreReader(open_current(root))
    results = {}
    for path, max_pairs in (("poolscore", 8192), ("gather", 8192), ("auto", 4)):
        rt = DecodeRuntime(model, VERSION, reader, device="cpu", path=path, batch_users=4, max_pairs=max_pairs)
        res = rt.score(order, cand, n_cand)
        assert res.cold_start.tolist() == [r is None for r in rows]
        assert rt.stats.cold_start_users == 2 and rt.stats.users == len(order)
        assert rt.stats.batches == 4 if max_pairs > 12 else rt.stats.batches >= 15 * 2 // 4  # <= 4 pairs a step
        assert np.isnan(res.logits[~real]).all() and np.isfinite(res.logits[real]).all()
        np.testing.assert_allclose(res.logits[real], want[real], **TOL[kv_dtype])
        results[path] = res.logits[real]
    np.testing.assert_allclose(results["poolscore"], results["gather"], rtol=1e-5, atol=1e-6)
    if kv_dtype == "float16":  # against the model fed the stored (rounded) user parts: fp32 tolerance
        with torch.no_grad():
            cache = model.prefill(it, fb, ln)
            if VARIANTS[variant][1] == "full":
                k, v = model.keys_values(cache)
                cache = KVCache(k, v, None, None, ln)
            rounded = dataclasses.replace(cache, k_user=cache.k_user.half().float(), v_user=cache.v_user.half().float())
            ref = model.decode(rounded, torch.from_numpy(cand)).numpy()
        np.testing.assert_allclose(results["poolscore"], ref[real], rtol=1e-5, atol=1e-5)


def random_cache(cfg, b: int, length: int, seed: int) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (b,), generator=g)
    pool = cfg.collective.pool_size

    def idx(shared: bool) -> torch.Tensor | None:
        return torch.randint(0, pool, (b, length), generator=g) if shared else None

    return KVCache(torch.randn(b, length, cfg.dk_user, generator=g, dtype=torch.float64),
                   torch.randn(b, length, cfg.dv_user, generator=g, dtype=torch.float64),
                   idx(cfg.k_shared), idx(cfg.v_shared), lengths)


@given(b=st.integers(1, 6), length=st.integers(1, 12), c=st.integers(1, 4), d_user=st.integers(1, 12),
       heads=st.sampled_from([1, 2, 4]), share=st.sampled_from(["both", "k", "v"]), seed=st.integers(0, 999))
@settings(max_examples=40, deadline=None)
def test_pool_score_algebra_equals_gather(b: int, length: int, c: int, d_user: int, heads: int, share: str,
                                          seed: int) -> None:
    """q·[k_u; P_k[i]] = q_u·k_u + (P_k q_c)[i] and Σ a_j P_v[i_j] = bincount(i, a) @ P_v, per head,
    for user dims within one head or spanning several (d_a = 16)."""
    coll = CollectiveConfig(d_user=d_user, pool_size=7, share_k=share != "v", share_v=share != "k")
    model = make_model(small_config(d_attn=16, n_heads=heads, collective=coll), seed=seed, dtype=torch.float64)
    resident = ResidentModel(model.eval(), "cpu")
    cache = random_cache(model.cfg, b, length, seed)
    targets = torch.randint(0, N_ITEMS + 1, (b, c), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fast = decode(resident, cache, targets, "poolscore")
        ref = decode(resident, cache, targets, "gather")
        plain = model.decode(cache, targets)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    # the resident model's per-item query table was projected in one batch of every item: the same sums,
    # up to the rounding order of a GEMM of another shape
    torch.testing.assert_close(ref, plain, rtol=1e-12, atol=1e-12)


def test_item_table_is_the_models_candidate_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResidentModel tabulates (embedding, query) per item id: gathers == the model's own candidate side; over
    ITEM_TABLE_BYTES no table is built and the model's own runs."""
    from collectivekv.cachestore.decode import decode as decode_mod

    model = make_model(small_config(), seed=3).eval()
    targets = torch.randint(0, N_ITEMS + 1, (5, 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.candidate_side(targets)
        resident = ResidentModel(model, "cpu")
        assert resident.item_rows is not None and resident.item_rows[0].shape[0] == N_ITEMS + 1
        for got, ref in zip(resident.candidate_side(targets), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        monkeypatch.setattr(decode_mod, "ITEM_TABLE_BYTES", 8)
        small = ResidentModel(model, "cpu")
        assert small.item_rows is None
        for got, ref in zip(small.candidate_side(targets), want, strict=True):
            assert torch.equal(got, ref)


def test_cold_start_counted_and_buffers_reused(served: dict) -> None:
    model, root = served["stores"]["collective", "float16"]
    reader = StoreReader(open_current(root))
    batcher = HostBatcher(reader.layout, reader=reader, pin=False, n_buffers=2, capacity_bytes=16)
    first = batcher.fetch([100, 5, 101, 6, 100])
    assert first.cold_start == 2 and first.present.tolist() == [True, False, True, False, True]
    assert first.lengths[1] == 0 and first.record(1) is None
    assert bytes(first.record(0)) == reader.get_raw(100)
    second = batcher.fetch(list(range(100, 112)))  # grows its buffer
    assert second.cold_start == 0 and bytes(second.record(11)) == reader.get_raw(111)
    assert bytes(first.record(2)) == reader.get_raw(101)  # still valid: a different buffer
    batcher.fetch([1, 2, 3])  # reuses the first batch's buffer
    with pytest.raises(RuntimeError, match="stale"):
        first.tensor  # noqa: B018
    assert batcher.fetch([]).n_users == 0


def test_model_version_mismatch_is_refused(served: dict, tmp_path: Path) -> None:
    model, root = served["stores"]["collective", "float16"]
    reader = StoreReader(open_current(root))
    with pytest.raises(ModelVersionMismatchError, match=f"model version {VERSION}.*fedcba9876543210"):
        DecodeRuntime(model, "fedcba9876543210", reader, device="cpu")
    # a store whose layout matches the checkpoint but one record was written by another model
    layout = layout_for(model, VERSION)
    other = dataclasses.replace(layout, model_version="fedcba9876543210")
    vdir = tmp_path / "version"
    (vdir / LMDB_DIR).mkdir(parents=True)
    write_layout(vdir / LAYOUT, layout)
    wider = dataclasses.replace(layout, parts=(dataclasses.replace(layout.parts[0], width=3), *layout.parts[1:]))
    # (a valid record, but not of this store's layout)
    env = lmdb.open(str(vdir / LMDB_DIR), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for uid, lay in ((1, layout), (2, other), (3, wider)):
            txn.put(user_key(uid), encode_entry(lay, 3, [np.ones((3, p.width), lay.dtype(p.kind)) for p in lay.parts]))
    env.close()
    rt = DecodeRuntime(model, VERSION, StoreReader(vdir), device="cpu")
    assert np.isfinite(rt.score([1, 4], [[1], [2]]).logits).all()
    with pytest.raises(ModelVersionMismatchError, match="user 2: model version fedcba9876543210 != expected"):
        rt.score([1, 2], [[1], [2]])
    with pytest.raises(RecordError, match="user 3: .*does not match the store layout"):
        rt.score([3], [[1]])


@pytest.mark.parametrize("mode", ["collective", "full"])
def test_store_from_the_prefill_job_scores_like_forward(tmp_path: Path, mode: str) -> None:
    """Contract with the Spark job's per-partition function (pipeline/prefill/prefill.py)."""
    from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
    from collectivekv.cachestore.store.publish import build_and_publish
    from collectivekv.pipeline.data.history import arrow_window
    from collectivekv.pipeline.prefill.prefill import cache_layout, prefill_batches

    model = make_model(small_config(), seed=2).eval()
    g = np.random.default_rng(5)
    hist_len = [0, 1, SEQ, SEQ + 5, *g.integers(0, 2 * SEQ, 8).tolist()]
    items = [g.integers(1, N_ITEMS + 1, n).tolist() for n in hist_len]
    labels = [g.integers(0, 2, n).tolist() for n in hist_len]
    users = list(range(500, 500 + len(hist_len)))
    batch = pa.record_batch({"user_id": pa.array(users, pa.int64()), "items": pa.array(items, pa.list_(pa.int32())),
                             "labels": pa.array(labels, pa.list_(pa.int8()))})
    layout = cache_layout(model.cfg, VERSION, mode)
    out = list(prefill_batches([batch], model, layout))
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_batches(out), tmp_path / "parquet" / "part-0.parquet")
    write_layout(tmp_path / "parquet" / PARQUET_LAYOUT_FILE, layout)
    build_and_publish(tmp_path)
    w = arrow_window(batch.column("items"), batch.column("labels"), SEQ)
    cand = g.integers(1, N_ITEMS + 1, (len(users), 2))
    want = forward_logits(model, torch.from_numpy(w.items), torch.from_numpy(w.feedback),
                          torch.from_numpy(w.lengths), cand)
    rt = DecodeRuntime(model, VERSION, StoreReader(open_current(tmp_path)), device="cpu")
    res = rt.score(users, cand)
    assert not res.cold_start.any()
    np.testing.assert_allclose(res.logits, want, **TOL["float16"])


def test_other_architectures_are_refused(served: dict) -> None:
    from collectivekv.model.zoo import create_model

    _, root = served["stores"]["collective", "float16"]
    sim = create_model(small_config(arch="sim", long_len=16))
    with pytest.raises(LayoutError, match="the store holds 'din' caches, but the checkpoint is arch 'sim'"):
        DecodeRuntime(sim, VERSION, StoreReader(open_current(root)), device="cpu")


def _child_fetch(batcher: HostBatcher, ids: list[int], queue: mp.Queue) -> None:
    try:
        host = batcher.fetch(ids)
        queue.put((os.getpid(), [None if host.record(b) is None else bytes(host.record(b)) for b in range(len(ids))]))
    except BaseException as exc:  # report instead of hanging the parent
        queue.put((os.getpid(), repr(exc)))


def test_reader_and_batcher_work_after_fork(served: dict) -> None:
    model, root = served["stores"]["collective", "float16"]
    reader = StoreReader(open_current(root))
    batcher = HostBatcher(reader.layout, reader=reader, pin=False)
    ids = [103, 4, 110]
    want = [bytes(r) if r is not None else None for r in (batcher.fetch(ids).record(b) for b in range(3))]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_fetch, args=(batcher, ids, queue))
    proc.start()
    pid, got = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0 and pid != os.getpid()
    assert got == want and want[1] is None and want[0] == reader.get_raw(103)
    assert batcher.fetch(ids).record(2) == reader.get_raw(110)  # the parent still reads


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ckv_score_end_to_end(served: dict, tmp_path: Path, fmt: str) -> None:
    model, root = served["stores"]["collective", "float32"]
    ckpt = tmp_path / "ckpt"
    version = save_checkpoint(ckpt, model, {})
    store = tmp_path / "store"
    items, feedback, lengths = served["items"], served["feedback"], served["lengths"]
    store_of_model(store, model, version, list(range(100, 112)), items, feedback, lengths, "collective", "float32")
    g = np.random.default_rng(1)
    users = g.choice([*range(100, 112), 5, 6], 60)
    cand = g.integers(1, N_ITEMS + 1, 60)
    table = pa.table({"request": np.arange(60), "user_id": users, "item_id": cand})
    req = tmp_path / f"requests.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(table, req)
    else:
        pq.write_table(table, req)
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(score_cmd, ["--store", str(store), "--checkpoint", str(ckpt), "--requests", str(req),
                                            "--out", str(out), "--device", "cpu", "--max-candidates", "2",
                                            "--batch-users", "3", "--chunk-rows", "25"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    cold = np.isin(users, [5, 6])
    assert summary["rows"] == 60 and summary["cold_start_users"] == len(set(users[cold].tolist()))
    got = pq.read_table(out)
    assert got.column_names == ["request", "user_id", "item_id", "logit", "score", "cold_start"]
    assert got.column("request").to_pylist() == list(range(60))
    rows = [u - 100 if u >= 100 else None for u in users]
    zero = torch.zeros(1, SEQ, dtype=torch.long)
    it = torch.cat([items[r : r + 1] if r is not None else zero for r in rows])
    fb = torch.cat([feedback[r : r + 1] if r is not None else zero for r in rows])
    ln = torch.tensor([int(lengths[r]) if r is not None else 0 for r in rows])
    want = forward_logits(model, it, fb, ln, cand.reshape(-1, 1)).reshape(-1)
    np.testing.assert_allclose(got.column("logit").to_numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.column("score").to_numpy(), 1 / (1 + np.exp(-want)), rtol=1e-5, atol=1e-6)
    assert got.column("cold_start").to_pylist() == cold.tolist()
    # a store prefilled by another model version: refused with a clear message, exit code 1
    other = tmp_path / "other"
    store_of_model(other, model, "00000000deadbeef", [100], items[:1], feedback[:1], lengths[:1])
    bad = CliRunner().invoke(score_cmd, ["--store", str(other), "--checkpoint", str(ckpt), "--requests", str(req),
                                         "--out", str(tmp_path / "x.parquet"), "--device", "cpu"])
    assert bad.exit_code == 1 and "model version 00000000deadbeef" in bad.output
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runtime_matches_cpu(served: dict) -> None:
    model, root = served["stores"]["collective", "float16"]
    reader = StoreReader(open_current(root))
    ids, cand = list(range(98, 114)), np.arange(1, 17).reshape(-1, 1) % N_ITEMS + 1
    cpu = DecodeRuntime(model, VERSION, reader, device="cpu").score(ids, cand).logits
    for path in ("poolscore", "gather"):
        rt = DecodeRuntime(make_model(model.cfg, seed=1).eval(), VERSION, reader, device="cuda", path=path)
        res = rt.score(ids, cand)
        np.testing.assert_allclose(res.logits, cpu, rtol=1e-4, atol=1e-4)
        assert rt.batcher.pin and rt.stats.h2d_bytes > 0 and (rt.stats.h2d_ms > 0) == (rt.tier is None)
