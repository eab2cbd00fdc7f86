"""Faults: the store build / publish killed (SIGKILL) at chosen and random points, a full disk during
the LMDB build. After each fault the published store is the previous one (or, for a kill after the
atomic switch, the complete new one), every record of it reads back, and a re-run completes.

Kills run the build in a child process (`python -c CHILD`) that SIGKILLs itself at a point chosen by
monkeypatching: the N-th record encoded (inside the LMDB write transaction), or the N-th directory
fsync of build_version / publish (1: staging complete, 2: renamed into versions/ but `current` not
switched, 4: `current` switched, versions not pruned). Random kills: the parent SIGKILLs the child
after a random delay. The Spark driver and worker kills are in tests/integration/test_reliability_spark.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collectivekv.cachestore.store.publish import current_version_id
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.pipeline.store.store_ops import build_store
from tests.cachestore.store.test_lmdb_store import make_rows, shuffled_parts, write_parquet
from tests.helpers import repo_env

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import os, signal, sys
import collectivekv.cachestore.store.lmdb_build as lb
import collectivekv.cachestore.store.publish as pub
from collectivekv.pipeline.store.store_ops import build_store

store, src, point, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = [0]

def killer(fn):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped

def after(fn):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped

if point == "record":
    lb.entry_from_parquet_row = killer(lb.entry_from_parquet_row)
elif point == "fsync":
    pub._fsync_dir = after(pub._fsync_dir)
elif point == "ready":
    print("ready", flush=True)
build_store(store, src, command_line="child")
print("done", flush=True)
"""


def child(store: Path, src: Path, point: str = "none", n: int = 0) -> subprocess.Popen:
    env = repo_env()
    return subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(src), point, str(n)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_all(store: Path) -> dict[int, bytes]:
    with StoreReader.open_current(store) as reader:
        return {u: reader.get_raw(u) for u in reader.iter_users()}


def assert_version_is(store: Path, rows: dict[int, dict]) -> None:
    """Every record of the current version decodes (CRC, model version) and equals `rows` (0 lost)."""
    with StoreReader.open_current(store) as reader:
        assert len(reader) == len(rows)
        for uid, rec in reader.iter_records():
            assert rec.arrays["kv.k_user"].tobytes() == rows[uid]["k_user"] and rec.length == rows[uid]["length"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    old, new = make_rows(list(range(300)), seed=1), make_rows(list(range(100, 4100)), seed=2)
    return {"tmp": tmp, "old": old, "new": new,
            "old_src": write_parquet(tmp / "old", old, parts=shuffled_parts(list(old), 2)),
            "new_src": write_parquet(tmp / "new", new, parts=shuffled_parts(list(new), 3))}


# (point, n, whether the new version is current afterwards)
KILLS = [("record", 1, False), ("record", 2000, False), ("fsync", 1, False), ("fsync", 2, False),
         ("fsync", 4, True)]


@pytest.mark.parametrize(("point", "n", "switched"), KILLS, ids=[f"{p}-{n}" for p, n, _ in KILLS])
def test_killed_build_or_publish_then_rerun(sources: dict, tmp_path: Path, point: str, n: int,
                                            switched: bool) -> None:
    store = tmp_path / "store"
    first = build_store(store, sources["old_src"], command_line="first")
    proc = child(store, sources["new_src"], point, n)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    if switched:  # killed after the one atomic rename: the new version is current and complete
        assert current_version_id(store) != first["version_id"]
        assert_version_is(store, sources["new"])
    else:
        assert current_version_id(store) == first["version_id"]
        assert_version_is(store, sources["old"])
    # the re-run completes and publishes; orphans of the killed run never become current and are pruned
    again = build_store(store, sources["new_src"], command_line="rerun")
    assert current_version_id(store) == again["version_id"]
    assert_version_is(store, sources["new"])
    assert len(os.listdir(store / "versions")) == 2
    # staging leftovers of the killed run (never published) are the only debris
    assert all(p.name != again["version_id"] for p in (store / "staging").iterdir())


def test_random_time_kills(sources: dict, tmp_path: Path) -> None:
    """SIGKILL at random moments of 4 build+publish runs: current is always old or new, never broken."""
    store = tmp_path / "store"
    first = build_store(store, sources["old_src"], command_line="first")
    rng = random.Random(1234)
    outcomes = []
    for _ in range(4):
        prev = current_version_id(store)
        prev_rows = sources["old"] if prev == first["version_id"] else sources["new"]
        proc = child(store, sources["new_src"], "ready")
        assert proc.stdout.readline().strip() == "ready"  # imports done: the build starts now
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        now = current_version_id(store)
        outcomes.append("killed" if proc.returncode == -signal.SIGKILL else "finished")
        assert_version_is(store, prev_rows if now == prev else sources["new"])
    print("random kills:", outcomes)
    build_store(store, sources["new_src"], command_line="rerun")
    assert_version_is(store, sources["new"])


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


RLIMIT_CHILD = r"""
import resource, signal, sys
from collectivekv.cachestore.store.lmdb_build import StoreBuildError
from collectivekv.pipeline.store.store_ops import build_store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
try:
    build_store(sys.argv[1], sys.argv[2], command_line="child")
except StoreBuildError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_full_disk_during_lmdb_build(sources: dict, tmp_path: Path, how: str) -> None:
    """tmpfs: a 3 MB tmpfs holds the old store, the new one does not fit (ENOSPC; needs root, skipped
    otherwise). rlimit: RLIMIT_FSIZE of 1 MB in a child (EFBIG), on the ordinary filesystem."""
    mnt = tmp_path / "mnt"
    mounted = how == "tmpfs" and _mount_tmpfs(mnt, "3m")
    if how == "tmpfs" and not mounted:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        store = mnt / "store"
        first = build_store(store, sources["old_src"], command_line="first")
        before = read_all(store)
        big = write_parquet(tmp_path / "big", make_rows(list(range(20_000)), seed=3), parts=[list(range(20_000))])
        if mounted:
            from collectivekv.cachestore.store.lmdb_build import StoreBuildError

            with pytest.raises(StoreBuildError, match="no space left on the device.*nothing was published"):
                build_store(store, big, command_line="full")
        else:
            proc = subprocess.run([sys.executable, "-c", RLIMIT_CHILD, str(store), str(big), str(1 << 20)],
                                  cwd=ROOT, env=repo_env(), capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 3, proc.stderr[-2000:]
            assert "file size limit (RLIMIT_FSIZE): cannot build the LMDB store" in proc.stdout
        assert current_version_id(store) == first["version_id"]
        assert read_all(store) == before
        assert os.listdir(store / "staging") == [] and os.listdir(store / "versions") == [first["version_id"]]
        build_store(store, sources["new_src"], command_line="rerun")  # space enough for this one: completes
        assert_version_is(store, sources["new"])
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
