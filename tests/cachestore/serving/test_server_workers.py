"""`ckv serve --workers N` (cachestore/serving/workers.py): several real serving processes on one port,
the metrics summed over them, a worker that dies started again, and a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CKV, repo_env
from tests.server_fixtures import ModelStore

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path]:
    work = tmp_path_factory.mktemp("workers")
    model = ModelStore.make(work, seed=3)
    model.publish(work / "store")
    return model, work / "store"


def _workers_of(supervisor: int) -> set[int]:
    """The supervisor's worker processes (its children other than multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    out = set()
    for pid in map(int, children):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"resource_tracker" not in cmd:
            out.add(pid)
    return out


def _score_on_new_connections(url: str, model: ModelStore, n: int) -> None:
    """n requests, each on its own connection (so the kernel spreads them over the workers); every reply
    must be the model's forward."""
    users, cands = [100, 101, 7], [[4, 5], [6, 1], [2]]
    want, cold = model.expected(np.array(users), np.array([[4, 5], [6, 1], [2, 0]]))
    for _ in range(n):
        with httpx.Client(timeout=30) as client:
            r = client.post(url + "/score", json={"user_ids": users, "candidates": cands})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model_version"] == model.model_version and doc["cold_start"] == cold.tolist()
        for i, c in enumerate(cands):
            np.testing.assert_allclose(doc["scores"][i], want[i, : len(c)], **TOL)


def _counter(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _wait_for(predicate, timeout: float = 60.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_workers_share_the_port_sum_metrics_restart_and_stop(published: tuple[ModelStore, Path],
                                                              tmp_path: Path) -> None:
    model, root = published
    log = tmp_path / "serve.log"
    cmd = [*CKV, "serve", "--store", str(root), "--port", "0", "--device", "cpu",
           "--workers", "2", "--max-wait-ms", "0"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=repo_env())
    try:
        ready = json.loads(proc.stdout.readline())
        url, pids = ready["listening"], set(ready["workers"])
        assert ready["model_version"] == model.model_version
        assert len(pids) == 2 and _workers_of(proc.pid) == pids

        _score_on_new_connections(url, model, 30)
        assert _counter(url, "ckv_requests_total", status="200") == 30  # the sum over both workers
        assert _counter(url, "ckv_users_scored_total") == 90
        assert _counter(url, "ckv_store_version_info", model_version=model.model_version) == 1

        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        assert _wait_for(lambda: len(_workers_of(proc.pid) - {victim}) == 2), "the dead worker was not restarted"
        (new,) = _workers_of(proc.pid) - pids
        assert _wait_for(lambda: f"ckv.serve[{new}] INFO serving" in log.read_text()), "the new worker did not load"
        _score_on_new_connections(url, model, 10)
        assert _counter(url, "ckv_requests_total", status="200") >= 40  # counts of the dead worker are kept

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not any(Path(f"/proc/{p}").exists() for p in pids - {victim})
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    assert "starting it again" in stderr and "Traceback" not in stderr


def test_a_worker_that_cannot_load_stops_the_server_with_one_line(tmp_path: Path) -> None:
    cmd = [*CKV, "serve", "--store", str(tmp_path), "--port", "0", "--device", "cpu",
           "--workers", "2"]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=repo_env(), timeout=120)
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no published store version" in errors[0], bad.stderr
    assert "Traceback" not in bad.stderr


def test_sigterm_while_a_worker_loads_stops_the_server_at_once(published: tuple[ModelStore, Path]) -> None:
    """A worker still loading (stopped with SIGSTOP: a slow load) does not hold the supervisor past a SIGTERM."""
    _, root = published
    proc = subprocess.Popen([*CKV, "serve", "--store", str(root), "--port", "0", "--device", "cpu", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=repo_env())
    kid, deadline = None, time.monotonic() + 60
    while kid is None and time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            kid = next((int(p) for p in kids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()),
                       None)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    assert kid is not None
    os.kill(kid, signal.SIGSTOP)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(kid, signal.SIGKILL)
    assert time.monotonic() - t0 < 20 and "asked to stop" in proc.stderr.read()
