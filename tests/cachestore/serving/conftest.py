"""Stores the serving tests share: one published din version (``published``) and the same kind of model's
records as a two-shard version (``store``), each with its checkpoint inside."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server_fixtures import SHARD_USERS, ModelStore, publish_sharded_with_checkpoint


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path]:
    work = tmp_path_factory.mktemp("server")
    model = ModelStore.make(work, seed=1)
    root = work / "store"
    model.publish(root)
    return model, root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path]:
    work = tmp_path_factory.mktemp("server_shards")
    model = ModelStore.make(work, seed=7, n_users=SHARD_USERS)
    publish_sharded_with_checkpoint(model, work)
    return model, work / "store"
