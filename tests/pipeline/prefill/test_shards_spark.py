"""The nightly prefill with ``--shards N`` on a real local Spark and the bundled MovieLens data: the shard function
is Spark's own partitioning, the shards hold exactly the unsharded store's records, ``ckv store verify`` checks
every shard, and an incremental run on a sharded store carries its rows over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from collectivekv.cachestore.store.publish import MANIFEST, open_current
from collectivekv.cachestore.store.sharded_reader import ShardedReader, open_reader
from collectivekv.cachestore.store.shards import shard_of
from collectivekv.jobs.store import store as store_cli
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from collectivekv.pipeline.training.trainer import build_model
from tests.helpers import prepare_movielens

pytestmark = pytest.mark.spark


def test_shard_function_is_sparks_hash_partitioning(spark: object) -> None:
    rng = np.random.default_rng(0)
    ids = np.concatenate([[0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1], rng.integers(0, 2**63 - 1, 500)])
    df = spark.createDataFrame([(int(u),) for u in ids], "user_id bigint")  # type: ignore[attr-defined]
    for n in (1, 3, 4, 7):
        rows = df.selectExpr("user_id", f"pmod(hash(user_id), {n}) AS s").collect()
        assert [r.s for r in rows] == shard_of([r.user_id for r in rows], n).tolist()
        parts = df.repartition(n, "user_id").selectExpr("user_id", "spark_partition_id() AS p").collect()
        assert [r.p for r in parts] == shard_of([r.user_id for r in parts], n).tolist()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("prefill_shards")
    prepare_movielens(tmp / "data")
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=50, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=64))
    save_checkpoint(tmp / "ckpt", build_model(load_dataset(tmp / "data", validate=False), cfg, seed=0).eval(), {})
    return {"tmp": tmp, "data": tmp / "data", "ckpt": tmp / "ckpt"}


def _opts(bundle: dict, store: Path, **kw: object) -> PrefillOptions:
    return PrefillOptions(checkpoint=str(bundle["ckpt"]), histories=str(bundle["data"]), store=str(store),
                          progress_interval=1.0, spark_log_level=None, command_line="test", **kw)


def _records(store: Path) -> dict[int, bytes]:
    with open_reader(store) as reader:
        return {u: reader.get_raw(u) for u in reader.iter_users()}


def test_sharded_prefill_same_records_verified_and_incremental(bundle: dict, spark: object) -> None:
    flat, sharded = bundle["tmp"] / "flat", bundle["tmp"] / "sharded"
    run_prefill(_opts(bundle, flat), spark=spark)
    manifest = run_prefill(_opts(bundle, sharded, shards=4), spark=spark)
    assert manifest["shards"]["count"] == 4 and manifest["prefill"]["shards"] == 4
    assert manifest["prefill"]["stage_to_publish_seconds"] < 10
    users = [e["users"] for e in manifest["shards"]["list"]]
    assert sum(users) == manifest["users"] == 671 and min(users) > 100
    records = _records(flat)
    assert _records(sharded) == records  # byte-identical records, every user exactly once
    vdir = open_current(sharded)
    assert sorted(p.name for p in (vdir / "parquet").iterdir()) == [
        "_layout.json", "_prefill.json", *[f"part-{k:05d}.parquet" for k in range(4)]]
    assert not (bundle["tmp"] / "sharded" / "staging").exists() or not any((sharded / "staging").iterdir())

    r = CliRunner().invoke(store_cli, ["verify", str(sharded), "--checkpoint", str(bundle["ckpt"]),
                                       "--histories", str(bundle["data"])])
    assert r.exit_code == 0 and "671 users in store" in r.output and "OK" in r.output, r.output

    again = run_prefill(_opts(bundle, sharded, shards=4, incremental=True), spark=spark)
    inc = again["prefill"]["incremental"]
    assert inc["previous"]["reusable"] and inc["carried"] == 671 and inc["recomputed"] == 0
    assert _records(sharded) == records
    with open_reader(sharded) as reader:
        assert isinstance(reader, ShardedReader)
        assert json.loads((reader.version_dir / MANIFEST).read_text())["shards"]["list"][0]["checksum"] == \
            manifest["shards"]["list"][0]["checksum"]  # same records, same digest
