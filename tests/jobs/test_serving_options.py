"""The serving options (jobs/serving_options.py → ServingConfig), the pipelined fetch of the runtime, and
`ckv score` through the resident tier — against a real published LMDB store and a saved checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.store.publish import open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.jobs.score import read_ahead
from collectivekv.jobs.score import score as score_cmd
from collectivekv.jobs.serving_options import parse_bytes
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.model.test_model import N_ITEMS, make_model, small_config
from tests.store_fixtures import store_of_model

SEQ = 8
USERS = list(range(100, 130))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("options")
    model = make_model(small_config(kv_mode="collective"), seed=1).eval()
    version = save_checkpoint(root / "ckpt", model, {})
    g = torch.Generator().manual_seed(2)
    n = len(USERS)
    lengths = torch.randint(0, SEQ + 1, (n,), generator=g)
    items = torch.randint(1, N_ITEMS + 1, (n, SEQ), generator=g)
    feedback = torch.randint(1, 3, (n, SEQ), generator=g)
    pad = torch.arange(SEQ).unsqueeze(0) >= lengths.unsqueeze(1)
    items[pad], feedback[pad] = 0, 0
    store_of_model(root / "store", model, version, USERS, items, feedback, lengths, "collective", "float16")
    return {"model": model, "version": version, "root": root}


def test_parse_bytes() -> None:
    assert parse_bytes("auto") is None and parse_bytes("0") == 0 and parse_bytes("8GiB") == 8 << 30
    assert parse_bytes("1.5M") == 1_500_000 and parse_bytes(" 64 kib ") == 64 << 10
    for bad in ("-1", "lots", "8 GB/s", ""):
        with pytest.raises(ValueError, match="is not a size"):
            parse_bytes(bad)


def test_config_is_frozen_and_overrides_apply(store: dict) -> None:
    cfg = ServingConfig(batch_users=4)
    with pytest.raises(AttributeError):
        cfg.batch_users = 8  # type: ignore[misc]
    reader = StoreReader(open_current(store["root"] / "store"))
    rt = DecodeRuntime(store["model"], store["version"], reader, cfg, device="cpu", tier_bytes=0)
    assert rt.config == cfg.replace(device="cpu", tier_bytes=0) and rt.batch_users == 4 and rt.tier is None
    with pytest.raises(ValueError, match="tier_bytes must be >= 0"):
        ServingConfig(tier_bytes=-1)
    rt.close()


def test_pipelined_fetch_scores_like_one_step_at_a_time(store: dict) -> None:
    """Steps fetched one ahead on the reader thread (n_buffers 2) == fetched in turn (n_buffers 1), over many
    steps of mixed candidate widths; the fetch ran on the reader thread."""
    reader = StoreReader(open_current(store["root"] / "store"))
    rng = np.random.default_rng(0)
    ids = rng.choice([*USERS, 5, 6, 7], 57)
    cand, n_cand = rng.integers(1, N_ITEMS + 1, (57, 3)), rng.integers(1, 4, 57)
    cfg = ServingConfig(device="cpu", batch_users=4, max_pairs=9, tier_bytes=0)
    serial = DecodeRuntime(store["model"], store["version"], reader, cfg, n_buffers=1)
    piped = DecodeRuntime(store["model"], store["version"], reader, cfg)
    threads: set[str] = set()
    fetch = piped.batcher.fetch
    piped.batcher.fetch = lambda *a, **k: (threads.add(threading.current_thread().name), fetch(*a, **k))[1]
    want, got = serial.score(ids, cand, n_cand), piped.score(ids, cand, n_cand)
    np.testing.assert_array_equal(got.logits, want.logits)
    assert got.cold_start.tolist() == want.cold_start.tolist() and got.stats.batches > 10
    assert threads and all(t.startswith("ckv-fetch") for t in threads)
    piped.close()
    assert piped._reader is None


def test_concurrent_callers_get_their_own_scores(store: dict) -> None:
    """score() from 4 threads at once (steps pipelined, and through a cache-mode tier): each caller gets exactly
    what a lone call gives (requests are serialised, never interleaved in the shared buffers)."""
    reader = StoreReader(open_current(store["root"] / "store"))
    rng = np.random.default_rng(7)
    requests = [(rng.choice([*USERS, 5], 13), rng.integers(1, N_ITEMS + 1, (13, 2))) for _ in range(8)]
    for tier_bytes in (0, 1024):
        cfg = ServingConfig(device="cpu", batch_users=4, tier_bytes=tier_bytes)
        alone = DecodeRuntime(store["model"], store["version"], reader, cfg)
        want = [alone.score(ids, cand).logits for ids, cand in requests]
        shared = DecodeRuntime(store["model"], store["version"], reader, cfg)
        got: dict[int, np.ndarray] = {}

        def work(k: int, rt: DecodeRuntime = shared, out: dict = got) -> None:
            for i in range(k, len(requests), 4):
                out[i] = rt.score(*requests[i]).logits

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, w in enumerate(want):
            np.testing.assert_allclose(got[i], w, rtol=1e-5, atol=1e-5)
        assert shared.stats.users == alone.stats.users == 8 * 13
        shared.close()
        alone.close()


def test_read_ahead_keeps_order_and_raises() -> None:
    assert list(read_ahead(iter(range(50)))) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(read_ahead(broken()))
    first = next(iter(read_ahead(iter(range(10**6)))))  # a consumer that stops early does not hang
    assert first == 0


def _score(store: dict, tmp_path: Path, *extra: str) -> tuple[dict, pa.Table]:
    rng = np.random.default_rng(4)
    users = rng.choice([*USERS, 5, 6], 80)
    req = tmp_path / "requests.parquet"
    pq.write_table(pa.table({"user_id": users, "item_id": rng.integers(1, N_ITEMS + 1, 80)}), req)
    out = tmp_path / f"scores{len(extra)}.parquet"
    result = CliRunner().invoke(score_cmd, ["--store", str(store["root"] / "store"), "--checkpoint",
                                            str(store["root"] / "ckpt"), "--requests", str(req), "--out", str(out),
                                            "--device", "cpu", "--batch-size", "4", "--chunk-rows", "30", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1]), pq.read_table(out)


def test_ckv_score_through_the_tier(store: dict, tmp_path: Path) -> None:
    """--tier-bytes 1GiB (whole store) and a 1 KB S3-FIFO / LRU cache (a few slots, evicting): LMDB's scores."""
    base_summary, base = _score(store, tmp_path)
    assert base_summary["runtime"]["tier_hits"] == 0
    for extra in (("--tier-bytes", "1GiB"), ("--tier-bytes", "1K", "--policy", "lru"), ("--tier-bytes", "1K")):
        summary, got = _score(store, tmp_path, *extra)
        np.testing.assert_allclose(got.column("logit").to_numpy(), base.column("logit").to_numpy(), rtol=1e-5,
                                   atol=1e-5)
        assert got.column("cold_start").to_pylist() == base.column("cold_start").to_pylist()
        rt = summary["runtime"]
        assert rt["tier_hits"] + rt["tier_misses"] == rt["users"] - rt["cold_start_users"]
        if extra[1] == "1GiB":  # whole store: every present user is a hit (cache hits depend on admission timing)
            assert rt["tier_misses"] == 0 and rt["tier_hits"] > 0


def test_ckv_score_refuses_bad_serving_options(store: dict, tmp_path: Path) -> None:
    args = ["--store", str(store["root"] / "store"), "--checkpoint", str(store["root"] / "ckpt"),
            "--requests", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "o.parquet")]
    pq.write_table(pa.table({"user_id": [100], "item_id": [1]}), tmp_path / "r.parquet")
    for extra, message in ((["--tier-bytes", "huge"], "is not a size"), (["--policy", "mru"], "--policy"),
                           (["--batch-size", "0"], "batch_users must be >= 1"),
                           (["--zero-copy"], "zero_copy=True needs graphs=True"),
                           (["--device", "gpu"], "device must be cpu, cuda or cuda:N")):
        device = [] if "--device" in extra else ["--device", "cpu"]
        result = CliRunner().invoke(score_cmd, [*args, *device, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o.parquet").exists()
