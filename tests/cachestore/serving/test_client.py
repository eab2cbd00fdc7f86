"""Serving a sharded store from several processes (cachestore/serving/client.py): two servers of one shard each,
reached through the client-side router, score every user as one server of both shards does; the router refuses
server sets that leave a shard out or serve one twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.serving.client import ServerClient, ServingError, ShardRouter
from collectivekv.cachestore.store.shards import shard_of
from tests.cachestore.serving.test_server import _padded
from tests.model.test_model import N_ITEMS
from tests.server_fixtures import COLD_USERS, FIRST_USER, ModelStore, start_server
from tests.server_fixtures import SHARD_COUNT as COUNT
from tests.server_fixtures import SHARD_USERS as N_USERS


def _server(root: Path, shards: tuple[int, ...] | None):  # noqa: ANN202 (RunningServer)
    return start_server(root, runtime=ServingConfig(device="cpu", batch_users=1, shards=shards))


def test_two_processes_with_disjoint_shards_score_as_one_with_all(store: tuple[ModelStore, Path]) -> None:
    model, root = store
    g = np.random.default_rng(0)
    pool = [*range(FIRST_USER, FIRST_USER + N_USERS), *COLD_USERS]
    requests = [[int(u) for u in g.choice(pool, int(g.integers(1, 9)))] for _ in range(12)]
    with _server(root, (0,)) as s0, _server(root, (1,)) as s1, _server(root, None) as both:
        router = ShardRouter([s1.url, s0.url])  # any order
        assert router.count == COUNT and router.owner.tolist() == [1, 0]
        single = ServerClient(both.url)
        for users in requests:
            cands = [g.integers(1, N_ITEMS + 1, int(g.integers(1, 4))).tolist() for _ in users]
            routed, direct = router.score(users, cands, dense_ids=True), single.score(users, cands, dense_ids=True)
            for got, want in zip(routed.scores, direct.scores, strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert routed.cold_start == direct.cold_start
            want, cold = model.expected(np.array(users), _padded(cands))
            assert routed.cold_start == cold.tolist()
            for i, c in enumerate(cands):
                np.testing.assert_allclose(routed.scores[i], want[i, : len(c)], rtol=1e-5, atol=1e-6)
        users = np.array(pool)
        where = router.route(users.tolist())
        assert (np.array([s1.url, s0.url])[where] == np.where(shard_of(users, COUNT) == 0, s0.url, s1.url)).all()
        with pytest.raises(ServingError) as wrong:  # a user sent to the other shard's process: 421 naming it
            ServerClient(s0.url).score([int(users[shard_of(users, COUNT) == 1][0])], [[1]], dense_ids=True)
        assert wrong.value.status == 421 and wrong.value.field == "user_ids[0]"
        router.close()
        single.close()


def test_router_refuses_a_server_set_that_does_not_cover_the_store(store: tuple[ModelStore, Path]) -> None:
    _, root = store
    with _server(root, (0,)) as s0, _server(root, None) as both:
        with pytest.raises(ValueError, match=r"no server serves shard\(s\) \[1\] of 2: start one with --shards 1"):
            ShardRouter([s0.url])
        with pytest.raises(ValueError, match="shard 0 is served by both"):
            ShardRouter([s0.url, both.url])


