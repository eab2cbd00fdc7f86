"""Building LMDB stores from prefill Parquet, publishing versions atomically, reading them back."""

from __future__ import annotations

import multiprocessing as mp
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import collectivekv.cachestore.store.lmdb_build as lmdb_build
from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.lmdb_build import StoreBuildError, build_lmdb, prefill_schema
from collectivekv.cachestore.store.publish import (
    PublishError,
    build_and_publish,
    build_version,
    current_version_id,
    new_staging_dir,
    open_current,
    publish,
)
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import ChecksumError, RecordError, write_layout
from tests.cachestore.store.test_record import din_layout

MV = "00112233445566aa"
LAYOUT = din_layout("float16", 2, 1, True, True, pool_size=10_000, max_len=50, model_version=MV)


def make_rows(user_ids: list[int], layout: EntryLayout = LAYOUT, seed: int = 0) -> dict[int, dict]:
    """Synthetic prefill rows: random lengths 0..max_len, fp16 values, router indices < pool; the din
    parts (k_user, v_user, k_idx, v_idx: bytes) beside the row's ``payload``."""
    rng = np.random.default_rng(seed)
    g = layout.flat_group
    rows = {}
    for uid in user_ids:
        n = int(rng.integers(0, layout.max_len + 1))
        dt = np.float16 if layout.kv_dtype == "float16" else np.float32
        row = {"user_id": uid, "length": n,
               "k_user": rng.standard_normal((n, g.dk)).astype(dt).tobytes(),
               "v_user": rng.standard_normal((n, g.dv)).astype(dt).tobytes()}
        for side in ("k", "v"):
            shared = getattr(g, f"{side}_shared")
            idx = rng.integers(0, layout.pool_size, n).astype(np.uint16) if shared else np.zeros(0)
            row[f"{side}_idx"] = idx.tobytes()
        row["model_version"] = layout.model_version
        row["payload"] = row["k_user"] + row["v_user"] + row["k_idx"] + row["v_idx"]
        row["checksum"] = zlib.crc32(row["payload"])
        rows[uid] = row
    return rows


def write_parquet(path: Path, rows: dict[int, dict], *, parts: list[list[int]],
                  layout: EntryLayout = LAYOUT) -> Path:
    """Write rows as one Parquet file per id list in `parts` (in that order), plus _layout.json."""
    path.mkdir(parents=True, exist_ok=True)
    schema = prefill_schema()
    for i, ids in enumerate(parts):
        cols = {name: [rows[u][name] for u in ids] for name in schema.names}
        pq.write_table(pa.table(cols, schema=schema), path / f"part-{i:05d}.parquet", row_group_size=37)
    (path / "_SUCCESS").write_bytes(b"")
    write_layout(path / "_layout.json", layout)
    return path


def shuffled_parts(ids: list[int], n_parts: int, seed: int = 1) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(ids).tolist()
    return [perm[i::n_parts] for i in range(n_parts)]


def assert_store_matches(reader: StoreReader, rows: dict[int, dict]) -> None:
    assert len(reader) == len(rows)
    assert list(reader.iter_users()) == sorted(rows)
    ids = list(rows)
    for uid, rec in zip(ids, reader.get_many(ids), strict=True):
        row = rows[uid]
        assert rec.length == row["length"] and rec.model_version == MV
        for name in ("k_user", "v_user", "k_idx", "v_idx"):
            assert rec.arrays[f"kv.{name}"].tobytes() == row[name]


IDS = [int(x) for x in np.random.default_rng(7).choice(10**12, 600, replace=False)] + [0, 2**63 - 1]


@pytest.fixture(scope="module")
def rows() -> dict[int, dict]:
    return make_rows(IDS)


def test_build_and_read_back_exactly(tmp_path: Path, rows: dict[int, dict]) -> None:
    src = write_parquet(tmp_path / "parquet", rows, parts=shuffled_parts(IDS, 5))
    stats = build_lmdb(src, tmp_path / "lmdb", progress=False, batch_size=50)
    assert not stats.sorted_input and stats.users == len(rows) and stats.map_retries == 0
    assert stats.behaviours == sum(r["length"] for r in rows.values())
    assert stats.empty_users == sum(r["length"] == 0 for r in rows.values())
    assert stats.payload_bytes == sum(len(r["payload"]) for r in rows.values())
    assert stats.payload_bytes == sum(len(r["k_user"]) * 2 + len(r["k_idx"]) for r in rows.values())
    assert set(os.listdir(tmp_path / "lmdb")) <= {"data.mdb", "lock.mdb"}
    staging = new_staging_dir(tmp_path / "store")
    build_version(src, staging)
    publish(tmp_path / "store", staging)
    with StoreReader.open_current(tmp_path / "store") as reader:
        assert reader.layout == LAYOUT
        assert_store_matches(reader, rows)
        assert reader.get(12345) is None and reader.get_many([12345, 0])[0] is None
        assert [u for u, _ in reader.iter_records()] == sorted(rows)
        assert reader.get_raw(0) == lmdb_values(tmp_path / "lmdb")[0]


def lmdb_values(path: Path) -> dict[int, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {int.from_bytes(k, "big"): bytes(v) for k, v in txn.cursor()}
    env.close()
    return out


def test_rebuild_and_sorted_input_give_identical_values(tmp_path: Path, rows: dict[int, dict]) -> None:
    src = write_parquet(tmp_path / "a", rows, parts=shuffled_parts(IDS, 4))
    build_lmdb(src, tmp_path / "l1", progress=False)
    build_lmdb(src, tmp_path / "l2", progress=False, map_size=1 << 16)  # forces MapFullError retries
    ordered = sorted(IDS)
    sorted_src = write_parquet(tmp_path / "b", rows, parts=[ordered[300:], ordered[:300]])
    stats = build_lmdb(sorted_src, tmp_path / "l3", progress=False, map_size=1 << 16)
    assert stats.sorted_input and stats.map_retries > 0
    values = lmdb_values(tmp_path / "l1")
    assert list(values) == sorted(rows)
    assert values == lmdb_values(tmp_path / "l2") == lmdb_values(tmp_path / "l3")


def test_many_write_transactions_give_the_same_records(tmp_path: Path, rows: dict[int, dict],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store larger than TXN_BYTES loads in several transactions (bounded memory): same records, and a map that
    fills mid-load grows and reloads only the open transaction's records."""
    src = write_parquet(tmp_path / "a", rows, parts=shuffled_parts(IDS, 4))
    build_lmdb(src, tmp_path / "one", progress=False)
    monkeypatch.setattr(lmdb_build, "TXN_BYTES", 2048)
    chunks = []
    real = lmdb_build._chunks
    monkeypatch.setattr(lmdb_build, "_chunks", lambda items, limit: (chunks.append(c) or c for c in real(items, limit)))
    many = build_lmdb(src, tmp_path / "many", progress=False, map_size=1 << 16)
    assert len(chunks) > 10 and many.map_retries > 0 and all(len(c) >= 1 for c in chunks)
    assert sum(len(c) for c in chunks) == len(rows)
    assert lmdb_values(tmp_path / "many") == lmdb_values(tmp_path / "one")


def test_full_mode_float32_and_empty_store(tmp_path: Path) -> None:
    full = din_layout("float32", 8, 8, False, False, max_len=5, model_version=MV)
    rows = make_rows(list(range(40, 0, -1)), full)
    src = write_parquet(tmp_path / "p", rows, parts=[list(rows)], layout=full)
    build_lmdb(src, tmp_path / "v" / "lmdb", progress=False)
    write_layout(tmp_path / "v" / "layout.json", full)
    reader = StoreReader(tmp_path / "v")
    rec = reader.get(3)
    assert "kv.k_idx" not in rec.arrays and rec.arrays["kv.k_user"].dtype == np.float32
    assert rec.arrays["kv.v_user"].tobytes() == rows[3]["v_user"]
    empty = write_parquet(tmp_path / "e", {}, parts=[[]])
    assert build_lmdb(empty, tmp_path / "el", progress=False).users == 0


@pytest.mark.parametrize(("mutate", "exc", "match"), [
    (lambda r: r[2].update(user_id=5), StoreBuildError, "duplicate user id 5"),
    (lambda r: r[2].update(user_id=-5), RecordError, "user -5: negative user id"),
    (lambda r: r[2].update(checksum=r[2]["checksum"] ^ 1), ChecksumError, "Parquet checksum"),
    (lambda r: r[2].update(length=99), RecordError, "max_len"),
])
def test_bad_input_errors_name_the_user(tmp_path: Path, mutate: Callable[[dict], None], exc: type,
                                        match: str) -> None:
    bad = {k: dict(v) for k, v in make_rows(list(range(10))).items()}
    mutate(bad)  # changes the row of user 2 (its key here stays 2)
    src = write_parquet(tmp_path / "p", bad, parts=[[0, 1, 5, 4], [9, 8, 7, 6, 3, 2]])
    with pytest.raises(exc, match=match) as info:
        build_lmdb(src, tmp_path / "lmdb", progress=False)
    if exc is StoreBuildError:
        assert "part-00000" in str(info.value) and "part-00001" in str(info.value)
    else:
        assert info.value.user_id == bad[2]["user_id"]
    assert not (tmp_path / "lmdb").exists()


def test_failed_build_publishes_nothing(tmp_path: Path, rows: dict[int, dict],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    write_parquet(store / "parquet", rows, parts=shuffled_parts(IDS, 3))
    first = build_and_publish(store)
    assert first.previous is None and current_version_id(store) == first.version_id
    reader_a = StoreReader.open_current(store)
    original, calls = lmdb_build.entry_from_parquet_row, []

    def flaky(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        if len(calls) == 100:
            raise RuntimeError("encoder crashed on record 100")
        return original(*args, **kwargs)

    monkeypatch.setattr(lmdb_build, "entry_from_parquet_row", flaky)
    with pytest.raises(RuntimeError, match="record 100"):
        build_and_publish(store)
    assert current_version_id(store) == first.version_id
    assert os.listdir(store / "staging") == [] and os.listdir(store / "versions") == [first.version_id]
    assert_store_matches(StoreReader.open_current(store), rows)
    assert_store_matches(reader_a, rows)
    # A staging dir that is incomplete is refused and changes nothing.
    staging = new_staging_dir(store)
    with pytest.raises(PublishError, match="incomplete"):
        publish(store, staging)
    assert current_version_id(store) == first.version_id


def test_readers_keep_their_version_across_publishes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    rows_a, rows_b = make_rows(IDS[:200], seed=1), make_rows(IDS[100:300], seed=2)
    write_parquet(store / "parquet", rows_a, parts=shuffled_parts(list(rows_a), 2))
    a = build_and_publish(store)
    reader_a = StoreReader.open_current(store)
    assert_store_matches(reader_a, rows_a)
    write_parquet(tmp_path / "pb", rows_b, parts=shuffled_parts(list(rows_b), 3))
    b = build_and_publish(store, tmp_path / "pb")
    assert (b.previous, b.pruned) == (a.version_id, ())
    assert open_current(store).name == b.version_id
    assert_store_matches(reader_a, rows_a)  # old reader: still A, consistently
    assert reader_a.get(IDS[250]) is None
    reader_b = StoreReader.open_current(store)
    assert reader_b.version_id == b.version_id
    assert_store_matches(reader_b, rows_b)
    c = build_and_publish(store, tmp_path / "pb", parquet="copy")
    assert (c.previous, c.pruned) == (b.version_id, (a.version_id,))
    assert sorted(os.listdir(store / "versions")) == sorted([b.version_id, c.version_id])
    assert_store_matches(reader_b, rows_b)
    assert_store_matches(reader_a, rows_a)  # pruned, but its open map stays readable (POSIX unlink)
    assert os.path.islink(store / "current") and os.readlink(store / "current") == f"versions/{c.version_id}"
    assert os.path.isfile(store / "versions" / c.version_id / "parquet" / "_layout.json")


def _child_reads(reader: StoreReader, uid: int, queue: mp.Queue) -> None:
    rec = reader.get(uid)
    queue.put((os.getpid(), rec.arrays["kv.k_user"].tobytes(), reader._pid == os.getpid()))


def test_reader_reopens_after_fork(tmp_path: Path) -> None:
    rows = make_rows(list(range(50)))
    store = tmp_path / "store"
    write_parquet(store / "parquet", rows, parts=[list(range(25, 50)), list(range(25))])
    build_and_publish(store)
    reader = StoreReader.open_current(store)
    uid = next(u for u, r in rows.items() if r["length"] > 0)
    assert reader.get(uid) is not None  # environment now open in the parent
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(reader, uid, queue))
    proc.start()
    pid, k_user, reopened = queue.get(timeout=30)
    proc.join(30)
    assert proc.exitcode == 0 and pid != os.getpid() and reopened
    assert k_user == rows[uid]["k_user"]
    assert reader.get(uid).arrays["kv.k_user"].tobytes() == rows[uid]["k_user"]


def test_two_readers_of_one_version_share_the_environment(tmp_path: Path) -> None:
    rows = make_rows(list(range(20)))
    store = tmp_path / "store"
    write_parquet(store / "parquet", rows, parts=[list(range(20))])
    build_and_publish(store)
    first, second = StoreReader.open_current(store), StoreReader.open_current(store)
    assert_store_matches(first, rows)
    assert_store_matches(second, rows)
    first.close()
    assert_store_matches(second, rows)
    assert_store_matches(first, rows)  # reopens after close
    first.close()
    second.close()


def test_one_publish_transaction_keeps_current_on_any_failure(tmp_path: Path, rows: dict[int, dict]) -> None:
    """``ckv store build`` and ``ckv refresh`` publish through ``publish_staged``: a failure while the
    version is completed (before or after its files are whole) removes the staging version and leaves
    ``current`` as it was; a success writes the completed manifest and switches ``current``."""
    import json

    from collectivekv.cachestore.store.publish import STAGING
    from collectivekv.pipeline.store.store_ops import build_store, publish_staged

    src = write_parquet(tmp_path / "parquet", rows, parts=shuffled_parts(IDS, 2))
    root = tmp_path / "store"
    build_store(root, src, command_line="test")
    first = current_version_id(root)

    def fail_on_built(manifest: dict) -> None:
        raise RuntimeError("disk full")

    def fail_when_complete(staging: Path) -> dict:
        build_version(src, staging)
        raise ValueError("checkpoint does not match the store")

    with pytest.raises(RuntimeError, match="disk full"):
        build_store(root, src, on_built=fail_on_built, command_line="test")
    with pytest.raises(ValueError, match="does not match"):
        publish_staged(root, new_staging_dir(root), fail_when_complete)
    assert current_version_id(root) == first and list((root / STAGING).iterdir()) == []
    manifest, result = publish_staged(root, new_staging_dir(root),
                                      lambda staging: {**build_version(src, staging), "refresh": {"run_id": "r1"}})
    assert result.previous == first and current_version_id(root) == result.version_id
    assert json.loads((root / "manifest.json").read_text())["refresh"] == {"run_id": "r1"}  # the stable link


def test_a_rebuilt_store_states_its_parquets_schema_version(tmp_path: Path, rows: dict[int, dict]) -> None:
    """The manifest's prefill_parquet_schema_version is the Parquet's (its prefill meta), not this release's."""
    import json

    from collectivekv.pipeline.store.store_ops import PREFILL_META_FILE, build_store

    src = write_parquet(tmp_path / "parquet", rows, parts=shuffled_parts(IDS, 2))
    build_store(tmp_path / "bare", src, command_line="test")  # no prefill meta: unknown
    (src / PREFILL_META_FILE).write_text(json.dumps({"prefill_parquet_schema_version": 1}))
    build_store(tmp_path / "old", src, command_line="test")
    for name, want in (("bare", None), ("old", 1)):
        manifest = json.loads((tmp_path / name / "current" / "manifest.json").read_text())
        assert manifest["prefill_parquet_schema_version"] == want
