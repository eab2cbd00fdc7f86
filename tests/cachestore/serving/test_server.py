"""The serving process (cachestore/serving, `ckv serve`): a real server on 127.0.0.1 and a real HTTP
client — scores, batching, bad requests, cold start, /metrics, /healthz, graceful shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.serving.payloads import ARROW_MIME
from collectivekv.cachestore.store.publish import open_current
from tests.helpers import CKV, repo_env
from tests.model.test_model import N_ITEMS
from tests.server_fixtures import COLD_USERS, ModelStore, start_server

TOL = dict(rtol=1e-5, atol=1e-6)


def _requests(model: ModelStore, n: int, seed: int) -> list[tuple[list[int], list[list[int]]]]:
    """n requests of 1..5 users (stored and cold) with 1..4 candidates each."""
    g = np.random.default_rng(seed)
    pool = [*model.user_ids, *COLD_USERS]
    out = []
    for _ in range(n):
        users = [int(u) for u in g.choice(pool, int(g.integers(1, 6)))]
        out.append((users, [g.integers(1, N_ITEMS + 1, int(g.integers(1, 5))).tolist() for _ in users]))
    return out


def _padded(cands: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(cands), max(map(len, cands))), dtype=np.int64)
    for i, c in enumerate(cands):
        out[i, : len(c)] = c
    return out


def _check(model: ModelStore, users: list[int], cands: list[list[int]], doc: dict) -> None:
    want, cold = model.expected(np.array(users), _padded(cands))
    assert doc["model_version"] == model.model_version
    assert doc["cold_start"] == cold.tolist()
    for i, c in enumerate(cands):
        np.testing.assert_allclose(doc["scores"][i], want[i, : len(c)], **TOL)


def test_server_scores_equal_runtime_and_model_forward(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    reqs = _requests(model, 40, seed=0)
    replies: list[dict | None] = [None] * len(reqs)
    with start_server(root, max_wait_ms=20.0) as srv, httpx.Client(base_url=srv.url) as client:
        def send(i: int) -> None:
            users, cands = reqs[i]
            r = client.post("/score", json={"user_ids": users, "candidates": cands})
            assert r.status_code == 200, r.text
            replies[i] = r.json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = srv.service.metrics.batch_users.collect()[0]
        n_batches = next(s.value for s in batches.samples if s.name == "ckv_batch_users_count")
    assert n_batches < len(reqs)  # concurrent requests were grouped into shared device batches
    runtime = DecodeRuntime.open(root, device="cpu")
    for (users, cands), doc in zip(reqs, replies, strict=True):
        _check(model, users, cands, doc)
        direct = runtime.score(users, _padded(cands), [len(c) for c in cands])
        for i, c in enumerate(cands):
            np.testing.assert_allclose(doc["scores"][i], direct.probabilities[i, : len(c)], **TOL)
    runtime.reader.close()


def _arrow(users: list, cands: list, types: tuple = (pa.int64(), pa.list_(pa.int64()))) -> bytes:
    table = pa.table({"user_id": pa.array(users, types[0]), "candidates": pa.array(cands, types[1])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_arrow_requests_score_like_json(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    users = [*model.user_ids, *COLD_USERS] * 20  # 540 users: more than one device batch of 512
    g = np.random.default_rng(3)
    cands = [g.integers(1, N_ITEMS + 1, int(g.integers(1, 4))).tolist() for _ in users]
    with start_server(root, max_batch_users=512) as srv:
        r = httpx.post(srv.url + "/score", content=_arrow(users, cands), headers={"content-type": ARROW_MIME})
    assert r.status_code == 200, r.text
    table = pa.ipc.open_stream(r.content).read_all()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    doc = {"model_version": meta["model_version"], "scores": table.column("scores").to_pylist(),
           "cold_start": table.column("cold_start").to_pylist()}
    assert table.column("user_id").to_pylist() == users
    assert r.headers["x-model-version"] == model.model_version
    _check(model, users, cands, doc)


BAD_JSON = [  # (body, status, field)
    (b'{"candidates": [[1]]}', 422, "user_ids"),
    (b'{"user_ids": [100]}', 422, "candidates"),
    (b'{"user_ids": 100, "candidates": [[1]]}', 422, "user_ids"),
    (b'{"user_ids": ["100"], "candidates": [[1]]}', 422, "user_ids[0]"),
    (b'{"user_ids": [100, NaN], "candidates": [[1], [1]]}', 422, "user_ids[1]"),
    (b'{"user_ids": [100, -3], "candidates": [[1], [1]]}', 422, "user_ids[1]"),
    (b'{"user_ids": [true], "candidates": [[1]]}', 422, "user_ids[0]"),
    (b'{"user_ids": [9223372036854775808], "candidates": [[1]]}', 422, "user_ids[0]"),
    (b'{"user_ids": [100, 101], "candidates": [[1, 2], [3, 0]]}', 422, "candidates[1][1]"),
    (b'{"user_ids": [100], "candidates": [[1, 2.5]]}', 422, "candidates[0][1]"),
    (b'{"user_ids": [100], "candidates": [[1, Infinity]]}', 422, "candidates[0][1]"),
    (b'{"user_ids": [100, 101], "candidates": [[1], [99999]]}', 422, "candidates[1][0]"),
    (b'{"user_ids": [100, 101], "candidates": [[1]]}', 422, "candidates"),
    (b'{"user_ids": [100], "candidates": [[]]}', 422, "candidates[0]"),
    (b'{"user_ids": [100], "candidates": [7]}', 422, "candidates[0]"),
    (b'{"user_ids": [], "candidates": []}', 422, "user_ids"),
    (json.dumps({"user_ids": [1] * 65, "candidates": [[1]] * 65}).encode(), 413, "user_ids"),
    (json.dumps({"user_ids": [1], "candidates": [[1] * 33]}).encode(), 413, "candidates[0]"),
    (b'{"user_ids": [1], "candidates": [[1]]' + b" " * 5000 + b"}", 413, "body"),
    (b"not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b"[" * 3000, 400, "body"),
]
BAD_ARROW = [
    (b"\x00garbage\xff" * 10, 400, "body"),
    (_arrow(["a"], [[1]], (pa.string(), pa.list_(pa.int64()))), 422, "user_id[0]"),  # text: an int-keyed store
    (_arrow([1, None], [[1], [2]]), 422, "user_id"),
    (_arrow([1], [[1, None]]), 422, "candidates.item"),
    (_arrow([-1], [[1]]), 422, "user_id[0]"),
    (_arrow([1], [[0]]), 422, "candidates[0][0]"),  # raw id 0: not in the catalogue
    (_arrow([1], [[-1]]), 422, "candidates.item[0]"),
    (_arrow([1], [[]]), 422, "candidates[0]"),
]


def test_bad_requests_get_4xx_naming_the_field_and_the_server_survives(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    with start_server(root, max_request_users=64, max_candidates=32, max_body_bytes=4096) as srv, \
            httpx.Client(base_url=srv.url) as client:
        cases = [(b, "application/json", s, f) for b, s, f in BAD_JSON]
        cases += [(b, ARROW_MIME, s, f) for b, s, f in BAD_ARROW]
        cases.append((b'{"user_ids": [1], "candidates": [[1]]}', "text/plain", 415, "content-type"))
        for body, ctype, status, field in cases:
            r = client.post("/score", content=body, headers={"content-type": ctype})
            assert (r.status_code, r.json()["field"]) == (status, field), (body[:80], r.text)
            assert r.json()["error"] and "Traceback" not in r.text
        r = client.post("/score", json={"user_ids": [100, 1], "candidates": [[1, 2], [3]]})
        assert r.status_code == 200
        _check(model, [100, 1], [[1, 2], [3]], r.json())
        counts = _samples(client.get("/metrics").text)
    assert counts["ckv_requests_total", (("status", "422"),)] == sum(c[2] == 422 for c in cases)
    assert counts["ckv_requests_total", (("status", "200"),)] == 1


def test_an_unexpected_failure_of_one_request_is_its_500_and_the_worker_lives_on(
        published: tuple[ModelStore, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a request's preparation in the scoring worker raises (here: a stand-in failure for user 7) fails
    that request alone (500, logged); the worker keeps scoring the others and every later request."""
    import collectivekv.cachestore.serving.batcher as batcher_mod

    model, root = published
    prepare = batcher_mod.to_dense_items

    def fail_for_user_7(request, *args):  # noqa: ANN001, ANN202
        if 7 in request.user_ids.tolist():
            raise RuntimeError("stand-in failure")
        return prepare(request, *args)

    monkeypatch.setattr(batcher_mod, "to_dense_items", fail_for_user_7)
    with start_server(root) as srv, httpx.Client(base_url=srv.url) as client:
        r = client.post("/score", json={"user_ids": [7], "candidates": [[1]]})
        assert r.status_code == 500 and r.json()["field"] == "server", r.text
        r = client.post("/score", json={"user_ids": [100, 1], "candidates": [[1, 2], [3]]})
        assert r.status_code == 200
        _check(model, [100, 1], [[1, 2], [3]], r.json())


def test_dense_ids_query_parameter(published: tuple[ModelStore, Path]) -> None:
    """?dense_ids=true takes the model's dense ids as they are (the fixture's checkpoint has no catalogue:
    raw id = dense id, so both score alike); a value other than true/false is a 400 naming it."""
    model, root = published
    body = {"user_ids": [100, 1], "candidates": [[1, 2], [3]]}
    with start_server(root) as srv, httpx.Client(base_url=srv.url) as client:
        raw = client.post("/score", json=body)
        dense = client.post("/score?dense_ids=true", json=body)
        bad = client.post("/score?dense_ids=maybe", json=body)
    assert raw.status_code == dense.status_code == 200 and raw.json()["scores"] == dense.json()["scores"]
    _check(model, [100, 1], [[1, 2], [3]], dense.json())
    assert (bad.status_code, bad.json()["field"]) == (400, "dense_ids")


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_unknown_users_are_cold_start_and_metrics_count(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    with start_server(root) as srv, httpx.Client(base_url=srv.url) as client:
        health = client.get("/healthz").json()
        r = client.post("/score", json={"user_ids": [COLD_USERS[0]], "candidates": [[1, 2, 3]]})
        assert r.json()["cold_start"] == [True]
        _check(model, [COLD_USERS[0]], [[1, 2, 3]], r.json())
        r = client.post("/score", json={"user_ids": [100, 5, 101], "candidates": [[1], [2], [3]]})
        assert r.json()["cold_start"] == [False, True, False]
        m = _samples(client.get("/metrics").text)
    assert health["status"] == "ok" and health["model_version"] == model.model_version
    assert health["store_version"] == open_current(root).name
    assert m["ckv_cold_start_users_total", ()] == 2 and m["ckv_users_scored_total", ()] == 4
    assert m["ckv_requests_total", (("status", "200"),)] == 2
    assert m["ckv_request_seconds_count", (("format", "json"),)] == 2
    assert m["ckv_queue_seconds_count", ()] == 2 and m["ckv_batch_users_count", ()] == 2
    assert m["ckv_store_version_info", (("model_version", model.model_version),
                                        ("store_version", health["store_version"]))] == 1
    assert m["ckv_swaps_total", ()] == 0 and m["ckv_failed_swaps_total", ()] == 0
    assert m["ckv_tier_hits_total", ()] == 0 and m["ckv_queue_users", ()] == 0


def test_graceful_shutdown_scores_every_queued_request(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    reqs = _requests(model, 12, seed=5)
    replies: list[httpx.Response | None] = [None] * len(reqs)
    srv = start_server(root, max_wait_ms=400.0, max_batch_users=10_000)
    client = httpx.Client(base_url=srv.url, timeout=30)

    def send(i: int) -> None:
        replies[i] = client.post("/score", json={"user_ids": reqs[i][0], "candidates": reqs[i][1]})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    while srv.service.batcher.queued_users < sum(len(u) for u, _ in reqs):  # all queued, none scored yet
        threading.Event().wait(0.005)
    srv.stop()
    for t in threads:
        t.join()
    client.close()
    for (users, cands), r in zip(reqs, replies, strict=True):
        assert r is not None and r.status_code == 200, r
        _check(model, users, cands, r.json())
    assert srv.service.versions.active is None  # released after the drain


def test_ckv_serve_process_serves_and_stops_on_sigterm(published: tuple[ModelStore, Path], tmp_path: Path) -> None:
    model, root = published
    env = repo_env()
    cmd = [*CKV, "serve", "--store", str(root), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["model_version"] == model.model_version
        r = httpx.post(ready["listening"] + "/score", json={"user_ids": [100], "candidates": [[4, 5]]}, timeout=30)
        assert r.status_code == 200
        _check(model, [100], [[4, 5]], r.json())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    bad = subprocess.run([*cmd[:5], str(tmp_path), *cmd[6:]], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "no published store version" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_server_through_the_resident_tier_counts_hits(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    reqs = _requests(model, 10, seed=9)
    runtime = ServingConfig(device="cpu", batch_users=64, tier_bytes=1 << 20)
    with start_server(root, runtime=runtime) as srv, httpx.Client(base_url=srv.url) as client:
        assert srv.service.versions.active.runtime.tier is not None
        for users, cands in reqs:
            r = client.post("/score", json={"user_ids": users, "candidates": cands})
            _check(model, users, cands, r.json())
        edge = [0, 2**63 - 1, 100]  # extreme ids are cold start and leave the tier as it was
        r = client.post("/score", json={"user_ids": edge, "candidates": [[1], [2], [3]]})
        _check(model, edge, [[1], [2], [3]], r.json())
        reqs.append((edge, [[1], [2], [3]]))
        m = _samples(client.get("/metrics").text)
    stored = sum(u in model.user_ids for users, _ in reqs for u in users)
    assert m["ckv_tier_hits_total", ()] == stored and m["ckv_tier_misses_total", ()] == 0
    assert m["ckv_cold_start_users_total", ()] == sum(len(u) for u, _ in reqs) - stored


def test_a_full_queue_answers_503_and_the_rest_are_scored(published: tuple[ModelStore, Path]) -> None:
    model, root = published
    replies: list[httpx.Response] = []
    with start_server(root, max_queue_users=3, max_wait_ms=1000.0, max_batch_users=10_000) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        def send() -> None:
            replies.append(client.post("/score", json={"user_ids": [100, 101], "candidates": [[1], [2]]}))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = client.post("/score", json={"user_ids": [100, 101], "candidates": [[1], [2]]})
        larger = client.post("/score", json={"user_ids": [100, 101, 102, 103], "candidates": [[1]] * 4})
    assert larger.status_code == 413 and larger.json()["field"] == "user_ids"  # never fits: not "retry later"
    full = [r for r in replies if r.status_code == 503]
    assert len(full) == 3 and full[0].json()["field"] == "queue" and full[0].headers["retry-after"] == "1"
    ok = [r for r in replies if r.status_code == 200] + [after]
    assert len(ok) == 2
    for r in ok:
        _check(model, [100, 101], [[1], [2]], r.json())
