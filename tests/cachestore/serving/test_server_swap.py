"""Hot swap in the serving process: a version published while clients score is taken over between
batches with no failed and no mixed-version response; the old version is freed; a version that fails
to load leaves the old one serving and is counted."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.serving.metrics import ServerMetrics
from collectivekv.cachestore.serving.versions import VersionManager
from tests.model.test_model import N_ITEMS
from tests.server_fixtures import COLD_USERS, ModelStore, start_server


def _client_loop(url: str, seed: int, stop: threading.Event, out: list) -> None:
    """Score random requests until stopped; append (users, candidates, status, reply json)."""
    g = np.random.default_rng(seed)
    pool = [*range(100, 124), *COLD_USERS]
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            users = [int(u) for u in g.choice(pool, int(g.integers(1, 4)))]
            cands = g.integers(1, N_ITEMS + 1, (len(users), 3))
            r = client.post("/score", json={"user_ids": users, "candidates": cands.tolist()})
            out.append((users, cands, r.status_code, r.json() if r.status_code == 200 else r.text))


def _verify(replies: list, models: dict[str, ModelStore], atol: float = 1e-6) -> dict[str, int]:
    """Every reply is 200 and equals the forward of the version it names; counts per version."""
    seen: dict[str, int] = {}
    for users, cands, status, doc in replies:
        assert status == 200, doc
        model = models[doc["store_version"]]
        assert doc["model_version"] == model.model_version
        want, cold = model.expected(np.array(users), cands)
        np.testing.assert_allclose(doc["scores"], want, rtol=1e-5, atol=atol)
        assert doc["cold_start"] == cold.tolist()
        seen[doc["store_version"]] = seen.get(doc["store_version"], 0) + 1
    return seen


def _wait(predicate, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture()
def two_models(tmp_path: Path) -> tuple[ModelStore, ModelStore]:
    return ModelStore.make(tmp_path, seed=1), ModelStore.make(tmp_path, seed=2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_publish_under_load_swaps_with_no_failed_or_mixed_responses(tmp_path: Path, two_models: tuple,
                                                                    device: str) -> None:
    """On CUDA the new version is loaded, its tier filled and its graphs captured by the loader thread while
    the worker replays the old version's graphs (captures are thread-local: neither breaks the other)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a, b = two_models
    root = tmp_path / "store"
    va = a.publish(root)
    replies: list = []
    stop = threading.Event()
    runtime = ServingConfig(device=device, batch_users=64, tier_bytes=None if device == "cuda" else 0)
    with start_server(root, max_wait_ms=1.0, runtime=runtime) as srv:
        old = weakref.ref(srv.service.versions.active.runtime)
        clients = [threading.Thread(target=_client_loop, args=(srv.url, s, stop, replies)) for s in range(4)]
        for t in clients:
            t.start()
        _wait(lambda: len(replies) >= 40)
        vb = b.publish(root)
        _wait(lambda: sum(1 for r in replies[-20:] if r[2] == 200 and r[3]["store_version"] == vb) >= 20)
        stop.set()
        for t in clients:
            t.join()
        gc.collect()
        assert old() is None  # the old version's runtime (model, pools, reader) was released
        health = httpx.get(srv.url + "/healthz").json()
    seen = _verify(replies, {va: a, vb: b}, atol=1e-6 if device == "cpu" else 1e-4)
    assert seen[va] >= 40 and seen[vb] >= 20
    assert health["swaps"] == 1 and health["failed_swaps"] == 0 and health["store_version"] == vb


def test_version_that_fails_to_load_leaves_the_old_one_serving(tmp_path: Path, two_models: tuple) -> None:
    a, b = two_models
    root = tmp_path / "store"
    va = a.publish(root)
    replies: list = []
    stop = threading.Event()
    with start_server(root) as srv:
        client = threading.Thread(target=_client_loop, args=(srv.url, 7, stop, replies))
        client.start()
        broken = a.publish(root, checkpoint=b.checkpoint)  # a's records with b's model: refused at load
        _wait(lambda: srv.service.versions.failed_swaps == 1)
        n = len(replies)
        _wait(lambda: len(replies) >= n + 10)  # still serving after the failure
        assert srv.service.versions.active.store_version == va
        metrics = httpx.get(srv.url + "/metrics").text
        health = httpx.get(srv.url + "/healthz").json()
        vb = b.publish(root)  # the next good version is taken over
        _wait(lambda: srv.service.versions.swaps == 1)
        n = len(replies)
        _wait(lambda: len(replies) >= n + 10)
        stop.set()
        client.join()
    seen = _verify(replies, {va: a, vb: b})
    assert broken not in seen and seen[va] >= 10 and seen[vb] >= 10
    assert "ckv_failed_swaps_total 1.0" in metrics and "ckv_swaps_total 0.0" in metrics
    assert health["failed_swaps"] == 1 and broken in health["last_error"] and "model version" in health["last_error"]


def test_next_version_is_warmed_at_the_candidate_widths_served(tmp_path: Path, two_models: tuple) -> None:
    """The loader scores one request of each candidate width the active version has served, so the first
    requests after a switch find their graphs (and buffers) ready instead of capturing them."""
    a, b = two_models
    root = tmp_path / "store"
    a.publish(root)
    versions = VersionManager(root, ServerMetrics(), poll_s=3600.0,
                              runtime=ServingConfig(device="cpu", batch_users=8, tier_bytes=0))
    try:
        active = versions.start()
        assert active.runtime.candidate_widths() == [1]  # the load's own warm-up request
        active.runtime.score(np.array([100, 101]), np.ones((2, 5), dtype=np.int64))
        active.runtime.score(np.array([102]), np.ones((1, 3), dtype=np.int64))
        vb = b.publish(root)
        assert versions.check()
        nxt = versions.switch()
        assert nxt.store_version == vb and nxt.runtime.candidate_widths() == [1, 3, 5]
    finally:
        versions.close()


def test_a_version_failing_after_its_runtime_opened_closes_that_runtime(tmp_path: Path, two_models: tuple,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the version's runtime is open (here its key scheme) closes the runtime: no LMDB map, file
    or device memory stays behind per failed swap."""
    import collectivekv.cachestore.serving.versions as versions_mod
    from collectivekv.cachestore.store.publish import open_current

    a, _ = two_models
    root = tmp_path / "store"
    a.publish(root)
    opened: list = []
    real_open = versions_mod.open_runtime

    def spy(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        opened.append(real_open(*args, **kw))
        return opened[-1]

    def bad_scheme(_: Path) -> str:
        raise ValueError("unknown id key scheme 'bogus'")

    monkeypatch.setattr(versions_mod, "open_runtime", spy)
    monkeypatch.setattr(versions_mod, "read_key_scheme", bad_scheme)
    with pytest.raises(ValueError, match="bogus"):
        versions_mod.load_version(open_current(root), ServingConfig(device="cpu", batch_users=8))
    assert len(opened) == 1 and opened[0].reader._env is None and opened[0].tier is None  # closed
