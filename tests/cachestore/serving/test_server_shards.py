"""`ckv serve --shards` on a sharded store: a real server on 127.0.0.1 and a real HTTP client. A server of one shard
scores its own users exactly as the unsharded store's server does, and answers a user of another shard with 421
naming the owning shard, without failing the rest of the batch; a server of every shard serves everyone."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.store.shards import shard_of
from tests.server_fixtures import FIRST_USER, ModelStore, start_server
from tests.server_fixtures import SHARD_COUNT as COUNT
from tests.server_fixtures import SHARD_USERS as N_USERS


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


def test_a_server_of_some_shards_does_not_follow_a_new_shard_count(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A version with another shard count changes the fleet's routing: a server of one shard keeps its version
    (a failed swap naming the cause) instead of switching to a count nobody routes for."""
    import time

    import tests.server_fixtures as sf

    model = ModelStore.make(tmp_path, seed=7, n_users=N_USERS)
    sf.publish_sharded_with_checkpoint(model, tmp_path)
    with start_server(tmp_path / "store", runtime=ServingConfig(device="cpu", batch_users=4, shards=(1,))) as server:
        monkeypatch.setattr(sf, "SHARD_COUNT", 3)
        sf.publish_sharded_with_checkpoint(model, tmp_path)
        deadline = time.monotonic() + 20
        while server.service.versions.failed_swaps == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["shards"] == {"count": 2, "served": [1]} and server.service.versions.failed_swaps == 1
        assert "restart this fleet's servers" in server.service.versions.last_error


def test_refresh_keeps_the_published_shard_count_by_default(store: tuple[ModelStore, Path], tmp_path: Path) -> None:
    """`ckv refresh` without --shards publishes as many shards as the current version has (1 for a new store)."""
    from collectivekv.jobs.refresh import current_shard_count

    assert current_shard_count(store[1]) == COUNT and current_shard_count(tmp_path / "new") == 1


def test_a_rebuild_keeps_the_model_published_with_the_store(tmp_path: Path) -> None:
    """`ckv store build STORE [--shards N]` (re-sharding, or back to one LMDB) publishes the current version's
    checkpoint with the new one, so the store is still served and refreshed."""
    import json

    from click.testing import CliRunner

    from collectivekv.jobs.cli import main
    from tests.server_fixtures import publish_sharded_with_checkpoint

    model = ModelStore.make(tmp_path, seed=7, n_users=N_USERS)
    publish_sharded_with_checkpoint(model, tmp_path)
    root = tmp_path / "store"
    for shards in ("3", "1"):
        res = CliRunner().invoke(main, ["store", "build", str(root), "--shards", shards, "--no-progress"])
        assert res.exit_code == 0, res.output
        manifest = json.loads((root / "current" / "manifest.json").read_text())
        assert manifest["checkpoint"]["model_version"] == manifest["model_version"]
        with start_server(root) as server:
            users = list(range(FIRST_USER, FIRST_USER + 4))
            reply = _post(server.url, users, [[1]] * 4)
            assert reply.status_code == 200 and not any(reply.json()["cold_start"])


def test_a_421_names_the_text_id_the_client_sent(tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, prefill_schema
    from collectivekv.cachestore.store.record import write_layout
    from collectivekv.cachestore.store.user_keys import key_of
    from collectivekv.pipeline.store.shard_ops import build_sharded_store
    from tests.store_fixtures import layout_for, prefill_rows

    model = ModelStore.make(tmp_path, seed=7, n_users=N_USERS)
    texts = [f"user-{i}" for i in range(N_USERS)]
    keys = [key_of(t) for t in texts]
    layout = layout_for(model.model, model.model_version, "collective", "float32")
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    rows = prefill_rows(model.model, layout, keys, model.items, model.feedback, model.lengths)
    pq.write_table(pa.Table.from_pylist(rows, schema=prefill_schema()), parquet / "part-00000.parquet")
    write_layout(parquet / PARQUET_LAYOUT_FILE, layout)
    (parquet / "_prefill.json").write_text(json.dumps({"user_key": "blake2b-63", "item_key": "int"}))
    build_sharded_store(tmp_path / "store", parquet, COUNT, checkpoint=model.checkpoint)
    owner = shard_of(np.array(keys), COUNT)
    mine, other = texts[int(np.argmax(owner == 0))], texts[int(np.argmax(owner == 1))]
    with start_server(tmp_path / "store", runtime=ServingConfig(device="cpu", batch_users=8, shards=(0,))) as server:
        bad = _post(server.url, [mine, other], [[1], [1]])
        assert bad.status_code == 421 and bad.json()["field"] == "user_ids[1]"
        assert f"user '{other}' belongs to shard 1 of {COUNT}" in bad.json()["error"]


def test_ckv_score_names_the_row_of_a_user_of_another_shard(store: tuple[ModelStore, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from collectivekv.jobs.cli import main

    _, root = store
    users = np.arange(FIRST_USER, FIRST_USER + N_USERS)
    mine, other = users[shard_of(users, COUNT) == 0][0], users[shard_of(users, COUNT) == 1][0]
    (tmp_path / "req.csv").write_text(f"user_id,item_id\n{mine},1\n{other},2\n")
    res = CliRunner().invoke(main, ["score", "--store", str(root), "--checkpoint", str(root / "current" / "checkpoint"),
                                    "--requests", str(tmp_path / "req.csv"), "--out", str(tmp_path / "o.parquet"),
                                    "--device", "cpu", "--dense-ids", "--shards", "0"])
    assert res.exit_code == 1 and f"req.csv: row 2: user {other} belongs to shard 1 of {COUNT}" in res.output
    assert not (tmp_path / "o.parquet").exists()


def test_a_loaded_version_has_every_served_shard_open(store: tuple[ModelStore, Path]) -> None:
    """The swap's warm-up reads every served shard, so no shard's LMDB is first opened after the switch (a pruned
    version's shard would then fail every request)."""
    import os

    from collectivekv.cachestore.serving.versions import load_version
    from collectivekv.cachestore.store.publish import open_current

    version = load_version(open_current(store[1]), ServingConfig(device="cpu", batch_users=8, shards=(0, 1)))
    try:
        here = f"{os.path.realpath(store[1] / 'current')}/shards/"
        mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if here in line}
        assert {f"{here}0000{k}/lmdb/data.mdb" for k in (0, 1)} <= mapped
    finally:
        version.close()


def test_a_shard_folder_that_is_another_shard_is_refused(store: tuple[ModelStore, Path], tmp_path: Path) -> None:
    """Swapped shard folders: opening any shard names the damage (its users were scored as cold starts)."""
    import json
    import os
    import shutil

    from collectivekv.cachestore.decode.sharded import open_runtime
    from collectivekv.cachestore.store.shards import ShardError
    from collectivekv.cachestore.store.store_check import StoreDamagedError

    real = Path(os.path.realpath(store[1] / "current"))
    version = Path(shutil.copytree(real, tmp_path / real.name))  # its own name: only the shards are wrong
    open_runtime(version, version / "checkpoint", ServingConfig(device="cpu", shards=(1,))).close()
    os.rename(version / "shards" / "00000", version / "shards" / "tmp")
    os.rename(version / "shards" / "00001", version / "shards" / "00000")
    os.rename(version / "shards" / "tmp", version / "shards" / "00001")
    with pytest.raises(StoreDamagedError, match="names shard 0 of 2 .* not shard 1 of 2"):
        open_runtime(version, version / "checkpoint", ServingConfig(device="cpu", shards=(1,)))
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["shards"]["list"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="no valid count and list"):
        open_runtime(version, version / "checkpoint", ServingConfig(device="cpu"))
