"""Sharded stores without Spark: the shard function, one shard's build and its refusals, a whole sharded version
(``ckv store build --shards N``) against the unsharded one, the deep check, and serving by shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.decode.sharded import ShardSetRuntime, open_runtime
from collectivekv.cachestore.store.lmdb_build import StoreBuildError
from collectivekv.cachestore.store.publish import MANIFEST, new_staging_dir, open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.shard_build import ShardTarget, build_shard, shard_schema
from collectivekv.cachestore.store.shard_version import check_store_version
from collectivekv.cachestore.store.sharded_reader import ShardedReader, check_shards, open_reader
from collectivekv.cachestore.store.shards import (
    ShardError,
    WrongShardError,
    murmur3_long,
    parse_shards,
    shard_of,
)
from collectivekv.cachestore.store.store_check import StoreDamagedError
from collectivekv.pipeline.prefill.incremental import FP_COL
from collectivekv.pipeline.store.shard_ops import build_sharded_store
from collectivekv.pipeline.store.store_ops import build_store
from tests.server_fixtures import ModelStore

COUNT = 3


def test_murmur3_matches_sparks_hash() -> None:
    # SELECT hash(CAST(x AS BIGINT)) on Spark 4.3 (the Spark test checks many more against a live session)
    ids = [0, 1, 2, -1, 2**63 - 1, 12345678901234, 42, 7]
    want = [-1670924195, -1712319331, -797927272, -939490007, -1604625029, -541747956, 1316951768, 1293116811]
    assert murmur3_long(ids).tolist() == want
    assert shard_of(ids, 4).tolist() == [int(h) % 4 for h in want]  # pmod: Python's % of a positive count


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50), st.integers(1, 64))
def test_shard_of_is_a_stable_function_into_range(ids: list[int], count: int) -> None:
    s = shard_of(ids, count)
    assert s.dtype == np.int64 and ((s >= 0) & (s < count)).all()
    assert s.tolist() == [int(shard_of([u], count)[0]) for u in ids]  # elementwise, no batch effect
    assert (shard_of(ids, 1) == 0).all()


def test_shard_of_spreads_users_evenly() -> None:
    counts = np.bincount(shard_of(np.arange(100_000), 8), minlength=8)
    assert counts.min() > 0.95 * 100_000 / 8 and counts.max() < 1.05 * 100_000 / 8


def test_parse_shards() -> None:
    assert parse_shards(None) is None and parse_shards("all") is None
    assert parse_shards("3") == (3,) and parse_shards("0,3") == (0, 3) and parse_shards("1-3,0") == (0, 1, 2, 3)
    for bad in ("x", "3-1", "-1", "1,,a"):
        with pytest.raises(ShardError, match="--shards"):
            parse_shards(bad)
    with pytest.raises(ValueError, match="shards"):
        ServingConfig(shards=())


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One model's users (ids 100..159) as an unsharded store and as a 3-shard store, both built from the same
    prefill Parquet; the checkpoint published in neither (passed explicitly)."""
    work = tmp_path_factory.mktemp("shards")
    model = ModelStore.make(work, seed=3, n_users=60)
    model.publish(work / "seed")  # writes work/seed.parquet-<version>/ (part file + _layout.json)
    parquet = model.parquet_dir(work / "seed")
    build_store(work / "flat", parquet)
    build_sharded_store(work / "sharded", parquet, COUNT)
    return {"model": model, "flat": work / "flat", "sharded": work / "sharded", "parquet": parquet}


def _records(reader: StoreReader | ShardedReader) -> dict[int, bytes]:
    return {u: reader.get_raw(u) for u in reader.iter_users()}


def test_sharded_version_holds_the_same_records(stores: dict) -> None:
    vdir = open_current(stores["sharded"])
    manifest = json.loads((vdir / MANIFEST).read_text())
    block = manifest["shards"]
    assert block["count"] == COUNT and [e["index"] for e in block["list"]] == [0, 1, 2]
    assert sum(e["users"] for e in block["list"]) == manifest["users"] == 60
    assert not (vdir / "lmdb").exists()
    assert all((vdir / e["path"] / "lmdb" / "data.mdb").is_file() for e in block["list"])
    with open_reader(stores["flat"]) as flat, open_reader(stores["sharded"]) as sharded:
        assert isinstance(sharded, ShardedReader) and len(sharded) == len(flat) == 60
        assert _records(sharded) == _records(flat)  # byte-identical records, each user once
        assert check_shards(sharded) == []
        for k, reader in sharded.readers.items():  # every user in its own shard
            assert reader.version_id == vdir.name and reader.shard == (k, COUNT)
            assert (shard_of(list(reader.iter_users()), COUNT) == k).all()
        users = list(range(95, 165))  # present and absent users
        assert [r and r.length for r in sharded.get_many(users)] == [r and r.length for r in flat.get_many(users)]
    assert len(check_store_version(vdir)) == COUNT


def test_one_shard_refuses_users_of_another(stores: dict) -> None:
    with ShardedReader(open_reader(stores["sharded"]).shards, [1]) as reader:
        other = next(u for u in range(100, 160) if shard_of([u], COUNT)[0] != 1)
        with pytest.raises(WrongShardError, match=rf"user {other} belongs to shard \d of 3; this process serves "
                                                  r"shard\(s\) 1"):
            reader.get_raw(other)


def _rows(ids: list[int], layout_version: str = "v") -> pa.RecordBatch:
    n = len(ids)
    return pa.RecordBatch.from_pydict({
        "user_id": ids, "length": [0] * n, "payload": [b""] * n, "model_version": [layout_version] * n,
        "checksum": [0] * n, FP_COL: [0] * n}, schema=shard_schema())  # fmt: skip


def test_build_shard_refuses_bad_rows_and_leaves_nothing(stores: dict, tmp_path: Path) -> None:
    layout = StoreReader(open_current(stores["flat"])).layout
    ids = [u for u in range(1000) if shard_of([u], 2)[0] == 0][:6]
    foreign = next(u for u in range(1000) if shard_of([u], 2)[0] == 1)
    cases = {
        "belongs to shard 1, not to shard 0 of 2": [ids[0], foreign],
        f"duplicate user id at user {ids[1]}": [ids[0], ids[1], ids[1]],
        f"user ids out of order at user {ids[0]}": [ids[1], ids[0]],
    }
    for message, rows in cases.items():
        staging = new_staging_dir(tmp_path)
        with pytest.raises(StoreBuildError, match=message):
            build_shard([_rows(rows[:1]), _rows(rows[1:])], shard_schema(), ShardTarget(staging, 0, 2, layout))
        assert [p.name for p in staging.rglob("*") if p.is_file()] == []


def test_check_shards_finds_users_in_the_wrong_shard(stores: dict, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(stores["sharded"], copy, symlinks=True)
    vdir = open_current(copy)
    manifest = json.loads((vdir / MANIFEST).read_text())
    a, b = manifest["shards"]["list"][0], manifest["shards"]["list"][1]
    a["path"], b["path"] = b["path"], a["path"]  # shard 0's entry names shard 1's directory and back
    (vdir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreDamagedError, match="names shard 1 of 3"):
        check_store_version(vdir)
    with ShardedReader(open_reader(copy).shards) as reader:
        problems = check_shards(reader)
    assert any(p.startswith("shard 0: user ") and "belongs to shard 1" in p for p in problems)
    assert any("digest" in p for p in problems)


def test_sharded_and_unsharded_stores_serve_identical_scores(stores: dict) -> None:
    model = stores["model"]
    users = np.arange(90, 170, dtype=np.int64)  # 60 stored users + cold starts
    cand = np.tile(np.arange(1, 5), (len(users), 1))
    # one user per step: the same computation for each user, so bit-identical scores (batches of many users
    # group users differently per shard, and the float sums may then differ in the last bit)
    with open_runtime(stores["flat"], model.checkpoint, device="cpu", batch_users=1) as flat, \
            open_runtime(stores["sharded"], model.checkpoint, device="cpu", batch_users=1) as sharded:
        assert isinstance(sharded, ShardSetRuntime) and sharded.served == (0, 1, 2)
        a, b = flat.score(users, cand), sharded.score(users, cand)
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.cold_start, b.cold_start)
        assert b.stats.users == len(users) and sharded.stats.users == len(users)
    with open_runtime(stores["sharded"], model.checkpoint, device="cpu", batch_users=16) as sharded:
        np.testing.assert_allclose(sharded.score(users, cand).logits, a.logits, rtol=1e-5, atol=1e-6)
    own = users[shard_of(users, COUNT) == 2]
    with open_runtime(stores["sharded"], model.checkpoint, device="cpu", batch_users=1, shards=(2,)) as one:
        np.testing.assert_array_equal(one.score(own, cand[: len(own)]).logits, a.logits[shard_of(users, COUNT) == 2])
        with pytest.raises(WrongShardError, match=r"user_ids\[0\] user 90 belongs to shard"):
            one.score(users[:3], cand[:3])
    with pytest.raises(ShardError, match="shard 5 does not exist"):
        open_runtime(stores["sharded"], model.checkpoint, device="cpu", shards=(5,))
    with pytest.raises(ValueError, match="not sharded"):
        open_runtime(stores["flat"], model.checkpoint, device="cpu", shards=(1,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shards_on_cuda_every_fast_path(stores: dict) -> None:
    """Each opened shard is a full runtime on the GPU: the fused kernel in CUDA graphs, the zero-copy gather from the
    shard's own LMDB map, and the resident tier; scores equal the unsharded store's on the same paths."""
    model = stores["model"]
    users = np.arange(90, 170, dtype=np.int64)
    cand = np.tile(np.arange(1, 5), (len(users), 1))
    for kw in ({"graphs": True}, {"graphs": True, "zero_copy": True, "tier_bytes": 0}, {"tier_bytes": None}):
        cfg = ServingConfig(device="cuda", batch_users=16, **kw)
        with open_runtime(stores["flat"], model.checkpoint, cfg) as flat, \
                open_runtime(stores["sharded"], model.checkpoint, cfg) as sharded:
            a, b = flat.score(users, cand), sharded.score(users, cand)
            np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-6, err_msg=str(kw))
            np.testing.assert_array_equal(a.cold_start, b.cold_start)
            if kw.get("tier_bytes") is None:
                assert all(rt.tier is not None for rt in sharded.runtimes.values())


def test_one_tier_budget_is_split_across_the_shards_served(stores: dict) -> None:
    """tier_bytes is the budget of the whole set: each of the 3 shards' tiers gets a third of it."""
    with open_runtime(stores["sharded"], stores["model"].checkpoint, device="cpu", batch_users=4,
                      tier_bytes=3 << 20) as sharded:
        assert [rt.tier.capacity for rt in sharded.runtimes.values()] == [1 << 20] * 3
