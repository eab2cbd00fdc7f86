"""Serving zoo stores: DecodeRuntime and `ckv score` for SIM, ETA, SDIM, TWIN and HSTU, against the training
model's forward, reading LMDB or through the resident tier (whole store, or a cache evicting under LRU / S3-FIFO).

Stores are built from each model's own prefill (tests/zoo_store_fixtures.py) through the real
Parquet → LMDB builder and publish step; one test per arch uses the Spark job's per-partition
function. The runtime's scores are compared with ``model.forward`` on the same batches the runtime
steps through (same users, so the same padded width): TWIN's per-head top-k breaks ties between
equal scores by position in a way that depends on the padded width (``torch.topk``), and with
CollectiveKV heads holding no user dims see only pool rows, so ties are common; on the same batches
the comparison is exact for every model. A full-KV store of a collective checkpoint scores like the
collective forward; cold-start users like an empty history."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
from collectivekv.cachestore.store.publish import build_and_publish, open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import write_layout
from collectivekv.jobs.score import score as score_cmd
from collectivekv.model.config import CollectiveConfig
from collectivekv.model.entry import full_cache
from collectivekv.model.zoo import PAPER_MODELS
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.cachestore.decode.zoo_serving_helpers import (
    ORDER,
    STEP,
    STORES,
    USERS,
    VERSION,
    reference,
    rounded,
    rows_of,
    sigmoid,
    take,
)
from tests.model.zoo_helpers import N_ITEMS, make_batch, make_model, zoo_config
from tests.zoo_store_fixtures import zoo_store_of_model


@pytest.mark.parametrize(("mode", "kv_dtype"), STORES)
@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_runtime_scores_equal_model_forward(zoo_served: dict, arch: str, mode: str, kv_dtype: str) -> None:
    s = zoo_served[arch]
    model, hist = s["model"], s["hist"]
    rows = rows_of(ORDER)
    g = np.random.default_rng(0)
    cand = g.integers(1, N_ITEMS + 1, (len(ORDER), 2))  # two candidates per user
    rt = DecodeRuntime(model, VERSION, StoreReader(open_current(s["stores"][mode, kv_dtype])), device="cpu",
                       batch_users=STEP)  # fmt: skip
    res = rt.score(ORDER, cand)
    assert res.cold_start.tolist() == [r is None for r in rows]
    assert rt.stats.cold_start_users == 2 and rt.stats.users == len(ORDER) and rt.stats.batches == 4
    assert rt.stats.candidates == 2 * len(ORDER) and rt.stats.h2d_bytes > 0
    want = reference(model, hist, rows, cand, STEP)  # the collective model's forward
    if kv_dtype == "float32":
        np.testing.assert_allclose(res.logits, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.probabilities, sigmoid(want), rtol=1e-5, atol=1e-6)
    else:  # against the model fed the stored (fp16-rounded) user parts: fp32 tolerance
        np.testing.assert_allclose(res.logits, reference(model, hist, rows, cand, STEP, "fp16"), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res.probabilities, sigmoid(want), rtol=0, atol=5e-3)
    if mode == "full":  # decodes the rebuilt full K/V exactly
        np.testing.assert_allclose(res.logits, reference(model, hist, rows, cand, STEP, "full"), rtol=1e-6, atol=1e-6)
    # cold start == forward on an empty history
    cold = [i for i, r in enumerate(rows) if r is None]
    with torch.no_grad():
        empty = model(*take(hist, [None] * len(cold)), torch.from_numpy(cand[cold]))[0].numpy()
    np.testing.assert_allclose(res.logits[cold], empty, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_candidate_counts_and_step_limits(zoo_served: dict, arch: str, tmp_path: Path) -> None:
    """1-3 candidates per user (padding → NaN), max_pairs splitting the requests into many steps, and
    the same requests in one step: the same scores. (TWIN with an unshared K: no top-k ties; see the
    module docstring.)"""
    s = zoo_served[arch]
    model, hist = s["model"], s["hist"]
    root = s["stores"]["collective", "float32"]
    if arch == "twin":
        model = make_model(zoo_config(arch, collective=CollectiveConfig(d_user=2, pool_size=12, share_k=False)), 1)
        root = zoo_store_of_model(tmp_path, model.eval(), VERSION, USERS, *hist, "collective", "float32")
    reader = StoreReader(open_current(root))
    g = np.random.default_rng(1)
    cand = g.integers(1, N_ITEMS + 1, (len(ORDER), 3))
    n_cand = g.integers(1, 4, len(ORDER))
    real = np.arange(3)[None, :] < n_cand[:, None]
    one = DecodeRuntime(model, VERSION, reader, device="cpu").score(ORDER, cand, n_cand)
    rt = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=3, max_pairs=4)
    many = rt.score(ORDER, cand, n_cand)
    assert rt.stats.batches > 4 and rt.stats.candidates == int(real.sum())
    assert np.isnan(many.logits[~real]).all() and np.isfinite(many.logits[real]).all()
    np.testing.assert_allclose(many.logits[real], one.logits[real], rtol=1e-5, atol=1e-6)
    assert many.cold_start.tolist() == one.cold_start.tolist() == [r is None for r in rows_of(ORDER)]
    padded = DecodeRuntime(model, VERSION, reader, device="cpu", pad_to=model.cfg.window_len + 2)  # static shapes
    np.testing.assert_allclose(padded.score(ORDER, cand, n_cand).logits[real], one.logits[real], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # each candidate scored independently: the same as one candidate at a time
        it, fb, ln = take(hist, rows_of(ORDER))
        single = np.stack([model(it, fb, ln, torch.from_numpy(cand[:, j]))[0].numpy() for j in range(3)], 1)
    if arch != "twin":
        np.testing.assert_allclose(many.logits[real], single[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("arch", "mode"), [(a, "collective") for a in PAPER_MODELS] + [("hstu", "full")])
def test_store_from_the_prefill_job_scores_like_forward(tmp_path: Path, arch: str, mode: str) -> None:
    """Contract with the Spark job's per-partition function (pipeline/prefill/prefill.py) for zoo checkpoints:
    its Parquet → the real builder → the runtime == forward on the windowed histories."""
    from collectivekv.pipeline.data.history import arrow_window
    from collectivekv.pipeline.prefill.prefill import cache_layout, prefill_batches

    model = make_model(zoo_config(arch), seed=2).eval()
    w = model.cfg.window_len
    g = np.random.default_rng(5)
    hist_len = [0, 1, w, w + 5, *g.integers(0, 2 * w, 6).tolist()]
    users = list(range(500, 500 + len(hist_len)))
    batch = pa.record_batch({
        "user_id": pa.array(users, pa.int64()),
        "items": pa.array([g.integers(1, N_ITEMS + 1, n).tolist() for n in hist_len], pa.list_(pa.int32())),
        "labels": pa.array([g.integers(0, 2, n).tolist() for n in hist_len], pa.list_(pa.int8()))})  # fmt: skip
    layout = cache_layout(model.cfg, VERSION, mode, "float32")
    assert isinstance(layout, EntryLayout)
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_batches(list(prefill_batches([batch], model, layout, 4))),
                   tmp_path / "parquet" / "part-0.parquet")  # fmt: skip
    write_layout(tmp_path / "parquet" / PARQUET_LAYOUT_FILE, layout)
    build_and_publish(tmp_path)
    win = arrow_window(batch.column("items"), batch.column("labels"), w)
    cand = g.integers(1, N_ITEMS + 1, (len(users), 2))
    with torch.no_grad():
        want = model(torch.from_numpy(win.items), torch.from_numpy(win.feedback), torch.from_numpy(win.lengths),
                     torch.from_numpy(cand))[0].numpy()  # fmt: skip
    rt = DecodeRuntime(model, VERSION, StoreReader(open_current(tmp_path)), device="cpu")  # one step: same batch
    res = rt.score(users, cand)
    assert not res.cold_start.any()
    np.testing.assert_allclose(res.logits, want, rtol=1e-5, atol=1e-6)


def test_din_cache_from_the_entry_builder(tmp_path: Path) -> None:
    """A din checkpoint served from a store of the zoo fixture builder (one group "kv"): through the din
    decode paths."""
    from tests.model.test_model import make_model as make_din
    from tests.model.test_model import small_config

    model = make_din(small_config(), seed=4).eval()
    items, feedback, lengths, targets = make_batch([0, 1, 8, 5, 3], 8, 2)
    root = zoo_store_of_model(tmp_path, model, VERSION, [1, 2, 3, 4, 5], items, feedback, lengths, "collective",
                              "float32")  # fmt: skip
    reader = StoreReader(open_current(root))
    assert isinstance(reader.layout, EntryLayout) and reader.layout.arch == "din"
    with torch.no_grad():
        want = model(items, feedback, lengths, targets)[0].numpy()
    for path in ("poolscore", "gather"):
        res = DecodeRuntime(model, VERSION, reader, device="cpu", path=path).score([1, 2, 3, 4, 5], targets.numpy())
        np.testing.assert_allclose(res.logits[:, 0], want, rtol=1e-5, atol=1e-6)


def test_ckv_score_on_a_zoo_store(zoo_served: dict, tmp_path: Path) -> None:
    s = zoo_served["sim"]
    model, hist = s["model"], s["hist"]
    ckpt = tmp_path / "ckpt"
    version = save_checkpoint(ckpt, model, {})
    store = zoo_store_of_model(tmp_path / "store", model, version, USERS, *hist, "collective", "float32")
    g = np.random.default_rng(2)
    users = g.choice([*USERS, 5, 6], 40)
    cand = g.integers(1, N_ITEMS + 1, 40)
    req = tmp_path / "requests.csv"
    pacsv.write_csv(pa.table({"request": np.arange(40), "user_id": users, "item_id": cand}), req)
    out = tmp_path / "scores.parquet"
    args = ["--store", str(store), "--checkpoint", str(ckpt), "--requests", str(req), "--device", "cpu"]
    result = CliRunner().invoke(score_cmd, [*args, "--out", str(out), "--max-candidates", "2", "--batch-users", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    cold = np.isin(users, [5, 6])
    assert summary["rows"] == 40 and summary["model_version"] == version
    assert summary["cold_start_users"] == len(set(users[cold].tolist()))
    got = pq.read_table(out)
    assert got.column_names == ["request", "user_id", "item_id", "logit", "score", "cold_start"]
    assert got.column("cold_start").to_pylist() == cold.tolist()
    with torch.no_grad():
        want = model(*take(hist, rows_of(users.tolist())), torch.from_numpy(cand))[0].numpy()
    np.testing.assert_allclose(got.column("logit").to_numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.column("score").to_numpy(), sigmoid(want), rtol=1e-5, atol=1e-6)
    bad = CliRunner().invoke(score_cmd, [*args, "--out", str(tmp_path / "x.parquet"), "--path", "poolscore"])
    assert bad.exit_code == 1 and "poolscore" in bad.output
    other_ckpt = tmp_path / "eta"
    save_checkpoint(other_ckpt, zoo_served["eta"]["model"], {})
    args[3] = str(other_ckpt)
    bad = CliRunner().invoke(score_cmd, [*args, "--out", str(tmp_path / "x.parquet")])
    assert bad.exit_code == 1 and "holds 'sim' caches" in bad.output
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_cuda_runtime_matches_cpu(zoo_served: dict, arch: str) -> None:
    s = zoo_served[arch]
    model, hist = s["model"], s["hist"]
    for mode, kv_dtype in STORES:
        reader = StoreReader(open_current(s["stores"][mode, kv_dtype]))
        cand = np.random.default_rng(3).integers(1, N_ITEMS + 1, (len(ORDER), 2))
        cpu = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=STEP).score(ORDER, cand)
        gpu_model = make_model(model.cfg, seed=1).eval()
        rt = DecodeRuntime(gpu_model, VERSION, reader, device="cuda", batch_users=STEP, tier_bytes=0)  # LMDB fetch
        res = rt.score(ORDER, cand)
        assert rt.batcher.pin and rt.stats.h2d_bytes > 0 and rt.stats.h2d_ms > 0
        assert res.cold_start.tolist() == cpu.cold_start.tolist()
        if arch == "twin":  # top-k ties may break differently on the GPU: compare with its own forward
            rows = rows_of(ORDER)
            with torch.no_grad():
                ref = []
                for lo in range(0, len(rows), STEP):
                    it, fb, ln = take(hist, rows[lo : lo + STEP])
                    cache = gpu_model.prefill(it.cuda(), fb.cuda(), ln.cuda())
                    cache = rounded(cache) if kv_dtype == "float16" else cache
                    if mode == "full":
                        cache = full_cache(gpu_model, cache)
                    ref.append(gpu_model.decode(cache, torch.from_numpy(cand[lo : lo + STEP]).cuda()).cpu())
            np.testing.assert_allclose(res.logits, torch.cat(ref).numpy(), rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_allclose(res.logits, cpu.logits, rtol=1e-4, atol=1e-4)


def _tier_runs(zoo_served: dict, arch: str, device: str, **kw: object) -> dict[str, tuple]:
    """Scores of two rounds of requests (ORDER, then ORDER reversed) through LMDB (tier off), the whole
    store resident, and a cache of 3 slots under LRU and S3-FIFO; with each runtime's tier hit counts."""
    s = zoo_served[arch]
    reader = StoreReader(open_current(s["stores"]["collective", "float16"]))
    slot = (reader.layout.record_size(reader.layout.max_len) + 7) & -8
    cand = np.random.default_rng(7).integers(1, N_ITEMS + 1, (len(ORDER), 3))
    ways = {"lmdb": dict(tier_bytes=0), "whole": dict(tier_bytes=1 << 30),
            "lru": dict(tier_bytes=3 * slot, policy="lru"), "s3fifo": dict(tier_bytes=3 * slot, policy="s3fifo")}
    out = {}
    for name, how in ways.items():
        rt = DecodeRuntime(s["model"] if device == "cpu" else make_model(s["model"].cfg, seed=1).eval(), VERSION,
                           reader, device=device, batch_users=STEP, **how, **kw)
        first = rt.score(ORDER, cand)
        if rt.tier is not None:
            rt.tier.drain()  # the misses are admitted asynchronously
        second = rt.score(ORDER[::-1], cand[::-1])
        out[name] = (first, second, rt.tier and rt.tier.mode, rt.stats.tier_hits, rt.stats.tier_misses)
    return out


def _check_tier_runs(runs: dict[str, tuple], tol: dict) -> None:
    lmdb = runs.pop("lmdb")
    present = 2 * (len(ORDER) - 2)  # two rounds; two users of ORDER are not in the store
    for name, (first, second, mode, hits, misses) in runs.items():
        assert mode == ("whole" if name == "whole" else "cache"), name
        for got, want in ((first, lmdb[0]), (second, lmdb[1])):
            np.testing.assert_allclose(got.logits, want.logits, **tol, err_msg=name)
            assert got.cold_start.tolist() == want.cold_start.tolist()
        assert hits + misses == present, name
        if name == "whole":
            assert misses == 0, name
        else:  # 3 slots for 10 users: misses, each fetched from LMDB and admitted, evicting
            assert misses > 0, name


@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_zoo_store_through_the_resident_tier_scores_like_lmdb(zoo_served: dict, arch: str) -> None:
    """Every zoo model's store, whole or cached with eviction, scores as read from LMDB (CPU)."""
    _check_tier_runs(_tier_runs(zoo_served, arch, "cpu"), dict(rtol=1e-6, atol=1e-6))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", PAPER_MODELS)
def test_cuda_zoo_tier_graph_scores_like_lmdb(zoo_served: dict, arch: str) -> None:
    """On CUDA the resident request is one graph (lookup + the model's fused decode over the arena)."""
    _check_tier_runs(_tier_runs(zoo_served, arch, "cuda", graphs=True), dict(rtol=1e-5, atol=1e-5))
