"""Per-event features through the nightly path on the bundled MovieLens: the Spark prefill reads the timestamps,
its records equal the in-process prefill's (memo engine = direct engine), ``ckv store verify`` rebuilds them from
the model, and an incremental run recomputes exactly the users whose window or the event before it changed."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collectivekv.cachestore.checkpoint import load_checkpoint
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.prefill.prefill import cache_layout, prefill_batches
from collectivekv.pipeline.prefill.prefill_engines import make_engine
from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from collectivekv.pipeline.training.trainer import build_model
from tests.helpers import prepare_movielens
from tests.pipeline.prefill.test_shards_spark import _records

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("event_features")
    ds = load_dataset(prepare_movielens(tmp / "data"), validate=False)
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=30, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=32), event_features=("gap", "hour"),
                      gap_buckets=8)
    save_checkpoint(tmp / "ckpt", build_model(ds, cfg, seed=0).eval(), {})
    return {"tmp": tmp, "data": tmp / "data", "ckpt": tmp / "ckpt", "histories": ds.histories}


def test_spark_prefill_with_event_features_verified_and_incremental(bundle: dict, spark: object) -> None:
    ckpt = load_checkpoint(bundle["ckpt"])
    assert ckpt.config.n_feedback == 1 + 2 * 8 * 24 and ckpt.config.event_time_unit == "s"
    store = bundle["tmp"] / "store"
    opts = {"checkpoint": str(bundle["ckpt"]), "store": str(store), "progress_interval": 1.0,
            "spark_log_level": None, "command_line": "test"}
    manifest = run_prefill(PrefillOptions(histories=str(bundle["data"]), **opts), spark=spark)
    assert manifest["users"] == 671 and list(manifest["prefill"]["model_config"]["event_features"]) == ["gap", "hour"]
    stored = _records(store)

    layout = cache_layout(ckpt.config, ckpt.model_version, "collective", "float16")
    for kind in ("memo", "direct"):  # auto picks direct for a model with event features
        engine = make_engine(ckpt.model, layout, kind)
        rows = pa.Table.from_batches(list(prefill_batches(bundle["histories"].to_batches(max_chunksize=128), engine,
                                                          layout)))
        assert {u: p for u, p in zip(rows.column("user_id").to_pylist(), rows.column("payload").to_pylist(),
                                     strict=True)} == {u: r[32:] for u, r in stored.items()}, kind
    assert make_engine(ckpt.model, layout, "auto").name == "direct"
    assert verify_store(store, bundle["ckpt"], bundle["data"]).ok

    # day 2: one user's last timestamp moves by an hour (its hour code changes), nothing else
    hist = bundle["histories"]
    uid = hist.column("user_id")[0].as_py()
    ts = hist.column("timestamps").to_pylist()
    ts[0][-1] += 3600
    day2 = hist.set_column(hist.schema.get_field_index("timestamps"), "timestamps",
                           pa.array(ts, pa.list_(pa.int64())))
    pq.write_table(day2, bundle["tmp"] / "day2.parquet")
    again = run_prefill(PrefillOptions(histories=str(bundle["tmp"] / "day2.parquet"), incremental=True, **opts),
                        spark=spark)
    inc = again["prefill"]["incremental"]
    assert inc["recomputed"] == 1 and inc["carried"] == 670
    after = _records(store)
    assert after[uid] != stored[uid] and {u: r for u, r in after.items() if u != uid} == \
        {u: r for u, r in stored.items() if u != uid}
    assert verify_store(store, bundle["ckpt"], Path(bundle["tmp"] / "day2.parquet")).ok
