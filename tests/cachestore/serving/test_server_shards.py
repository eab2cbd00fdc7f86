"""`ckv serve --shards` on a sharded store: a real server on 127.0.0.1 and a real HTTP client. A server of one shard
scores its own users exactly as the unsharded store's server does, and answers a user of another shard with 421
naming the owning shard, without failing the rest of the batch; a server of every shard serves everyone."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.store.entry import read_layout
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
from collectivekv.cachestore.store.publish import new_staging_dir
from collectivekv.cachestore.store.shard_build import ShardTarget, build_shard, shard_schema
from collectivekv.cachestore.store.shards import shard_of
from collectivekv.pipeline.store.shard_ops import shard_rows
from collectivekv.pipeline.store.store_ops import publish_sharded
from tests.server_fixtures import FIRST_USER, ModelStore, start_server

COUNT = 2
N_USERS = 16


def publish_sharded_with_checkpoint(model: ModelStore, root: Path) -> None:
    """The model's records as a COUNT-shard version with its checkpoint inside (as ``ckv refresh --shards``)."""
    model.publish(root / "seed")
    parquet = next((root / "seed").glob("parquet-*"))
    layout = read_layout(parquet / PARQUET_LAYOUT_FILE)
    files = sorted(parquet.glob("*.parquet"))
    assert pq.read_metadata(files[0]).num_rows == N_USERS
    staging = new_staging_dir(root / "store")
    entries = [build_shard(shard_rows(files, shard_schema(), k, COUNT).to_batches(), shard_schema(),
                           ShardTarget(staging, k, COUNT, layout)) for k in range(COUNT)]
    shutil.copytree(model.checkpoint, staging / "checkpoint")
    publish_sharded(root / "store", staging, layout, entries, COUNT, prefill=None, command_line="test")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path]:
    work = tmp_path_factory.mktemp("server_shards")
    model = ModelStore.make(work, seed=7, n_users=N_USERS)
    publish_sharded_with_checkpoint(model, work)
    return model, work / "store"


def _post(url: str, users: list[int], cands: list[list[int]]) -> httpx.Response:
    return httpx.post(f"{url}/score?dense_ids=true", json={"user_ids": users, "candidates": cands}, timeout=30)


def test_one_shard_server_scores_its_users_and_names_the_owner_of_others(store: tuple[ModelStore, Path]) -> None:
    model, root = store
    users = np.arange(FIRST_USER, FIRST_USER + N_USERS)
    mine, other = users[shard_of(users, COUNT) == 1], users[shard_of(users, COUNT) == 0]
    cands = [[1, 2, 3]] * len(mine)
    runtime = ServingConfig(device="cpu", batch_users=1, shards=(1,))
    with start_server(root, runtime=runtime) as server:
        ok = _post(server.url, mine.tolist(), cands)
        assert ok.status_code == 200, ok.text
        want, cold = model.expected(mine, np.array(cands))
        np.testing.assert_allclose(np.array(ok.json()["scores"]), want, rtol=1e-5, atol=1e-6)
        assert not any(ok.json()["cold_start"])
        bad = _post(server.url, [int(mine[0]), int(other[0])], [[1], [1]])
        assert bad.status_code == 421
        body = bad.json()
        assert body["field"] == "user_ids[1]"
        assert f"user {int(other[0])} belongs to shard 0 of 2" in body["error"] and "serves shard(s) 1" in body["error"]
        assert _post(server.url, mine[:1].tolist(), [[1]]).status_code == 200  # still serving
        assert httpx.get(f"{server.url}/healthz").json()["shards"] == {"count": 2, "served": [1]}
    with start_server(root, runtime=ServingConfig(device="cpu", batch_users=1)) as server:  # every shard
        both = _post(server.url, users.tolist(), [[1, 2]] * len(users))
        assert both.status_code == 200, both.text
        want, _ = model.expected(users, np.array([[1, 2]] * len(users)))
        np.testing.assert_allclose(np.array(both.json()["scores"]), want, rtol=1e-5, atol=1e-6)
