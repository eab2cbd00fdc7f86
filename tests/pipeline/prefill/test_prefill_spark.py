"""The nightly prefill job with a real local Spark on the bundled MovieLens data.

One `spark-submit jobs/prefill.py` subprocess (the job end to end, as a platform runs it); the other
runs use the session-scoped in-process SparkSession (tests/conftest.py) to stay fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collectivekv.cachestore.store.publish import current_version_id
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.jobs.report import report as report_cli
from collectivekv.jobs.store import store as store_cli
from collectivekv.model.cache_spec import compression_rate
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.prefill.prefill import PrefillInputError
from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from collectivekv.pipeline.training.trainer import build_model
from tests.helpers import prepare_movielens, run_prefill_submit

pytestmark = pytest.mark.spark
ROOT = Path(__file__).resolve().parents[3]
MOVIELENS = ROOT / "data" / "movielens"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bundled data prepared by `ckv data prepare`, and a tiny untrained checkpoint."""
    tmp = tmp_path_factory.mktemp("prefill")
    data = prepare_movielens(tmp / "data")
    dataset = load_dataset(data, validate=False)
    cfg = ModelConfig(n_items=1, embed_dim=8, d_attn=16, n_heads=2, max_len=50, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=64))
    model = build_model(dataset, cfg, seed=0).eval()
    version = save_checkpoint(tmp / "ckpt", model, {})
    return {"tmp": tmp, "data": data, "ckpt": tmp / "ckpt", "version": version, "cfg": model.cfg,
            "users": dataset.n_users}


@pytest.fixture(scope="module")
def submitted(bundle: dict) -> dict:
    """`spark-submit --master local[2] jobs/prefill.py` as a subprocess, once for the module."""
    store = bundle["tmp"] / "store"
    proc = run_prefill_submit("--checkpoint", str(bundle["ckpt"]), "--histories", str(bundle["data"]),
                              "--out", str(store), "--progress-interval", "1")
    return {"store": store, "stdout": proc.stdout, "stderr": proc.stderr}


def raw_values(store: Path) -> dict[int, bytes]:
    with StoreReader.open_current(store) as reader:
        return {uid: reader.get_raw(uid) for uid in reader.iter_users()}


def opts(bundle: dict, store: Path, **kw: object) -> PrefillOptions:
    return PrefillOptions(checkpoint=str(bundle["ckpt"]), histories=str(bundle["data"]), store=str(store),
                          progress_interval=1.0, spark_log_level=None, command_line="test", **kw)


def test_spark_submit_end_to_end(bundle: dict, submitted: dict) -> None:
    store = submitted["store"]
    assert "published" in submitted["stdout"]
    assert "[ckv prefill] partition" in submitted["stderr"] and "users/s" in submitted["stderr"]
    m = json.loads((store / "manifest.json").read_text())  # STORE/manifest.json -> current/manifest.json
    assert m["users"] == bundle["users"] and m["model_version"] == bundle["version"]
    parts = {"kv.k_user": 1, "kv.v_user": 1, "kv.k_idx": 1, "kv.v_idx": 1}
    assert m["arch"] == "din" and m["dims"] == {"d_attn": 16, "d_user": 1, "max_len": 50, "parts": parts}
    assert m["record_format_version"] == 2 and m["layout"]["layout_version"] == 2
    assert m["dtypes"] == {"kv": "float16", "index": "uint16"} and m["pool_size"] == 64
    assert m["bytes"]["parquet"] > 0 and m["bytes"]["lmdb_disk"] > 0 and m["bytes"]["payload"] > 0
    assert "jobs/prefill.py" in m["command_line"] and m["created_at"]
    assert m["prefill"]["spark"]["master"] == "local[2]"
    parquet = pq.read_table(store / "parquet")  # STORE/parquet -> current/parquet
    assert parquet.num_rows == bundle["users"]
    assert parquet.column("model_version").unique().to_pylist() == [bundle["version"]]
    assert (store / "lmdb" / "data.mdb").is_file()
    assert list((store / "staging").iterdir()) == []
    r = CliRunner().invoke(store_cli, ["verify", str(store), "--checkpoint", str(bundle["ckpt"]),
                                       "--histories", str(bundle["data"])])
    assert r.exit_code == 0, r.output
    assert f"checked {bundle['users']} users" in r.output and "OK" in r.output


def test_full_baseline_and_size_report(bundle: dict, submitted: dict, spark: object) -> None:
    full = bundle["tmp"] / "full"
    m = run_prefill(opts(bundle, full, mode="full"), spark)
    assert m["mode"] == "full" and m["dims"]["parts"]["kv.k_user"] == 16 and m["dtypes"]["index"] is None
    res = verify_store(full, bundle["ckpt"], bundle["data"])
    assert res.ok and res.users_checked == bundle["users"], res.mismatches
    r = CliRunner().invoke(report_cli, ["size", str(submitted["store"]), "--baseline", str(full), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    cr = compression_rate(bundle["cfg"], 2)
    assert rep["store"]["cr"]["formula"] == pytest.approx(cr)  # (2 x 1 x 2 B + 2 x 2 B) / (2 x 16 x 4 B)
    assert rep["store"]["cr"]["payload"] == pytest.approx(cr)
    assert rep["baseline"]["cr"]["formula"] == pytest.approx(0.5)  # fp16 full K,V vs fp32
    assert rep["vs_baseline"]["same_users"]
    assert rep["vs_baseline"]["payload"] == pytest.approx(cr / 0.5)
    assert rep["vs_baseline"]["lmdb_disk"] < 0.5
    t = rep["store"]["token_table"]  # din: every part a function of the token
    assert t["applies"] and t["vocabulary"] == 2 * bundle["cfg"].n_items
    assert t["store_payload_bytes"] == t["token_id_bytes"] * rep["store"]["behaviours"]
    assert t["cr"] == pytest.approx(t["store_payload_bytes"] / rep["store"]["full_fp32_bytes"])
    table = CliRunner().invoke(report_cli, ["size", str(submitted["store"]), "--baseline", str(full)]).output
    assert "CR formula" in table and "LMDB on disk" in table and "baseline" in table
    assert "token-table alternative" in table and "choose:" in table


def test_rerun_is_byte_identical_and_old_reader_stays_consistent(bundle: dict, submitted: dict,
                                                                  spark: object) -> None:
    store = submitted["store"]
    before = raw_values(store)
    old_id = current_version_id(store)
    old_reader = StoreReader.open_current(store)
    some = sorted(before)[:: max(1, len(before) // 50)]
    assert [old_reader.get_raw(u) for u in some] == [before[u] for u in some]
    m = run_prefill(opts(bundle, store), spark)  # same inputs, in-process this time
    assert current_version_id(store) == m["version_id"] != old_id
    # the reader opened before the publish still reads its own (old) version, consistently
    assert old_reader.version_id == old_id
    assert [old_reader.get_raw(u) for u in some] == [before[u] for u in some]
    assert len(old_reader) == len(before)
    old_reader.close()
    assert raw_values(store) == before  # every LMDB value byte-identical across the two runs
    # a standalone rebuild (`ckv store build STORE`) gives the same values and keeps the metadata
    r = CliRunner().invoke(store_cli, ["build", str(store), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert raw_values(store) == before
    assert json.loads((store / "manifest.json").read_text())["dims"]["d_attn"] == 16


def test_failure_mid_way_publishes_nothing(bundle: dict, spark: object) -> None:
    store = bundle["tmp"] / "fail"
    first = run_prefill(opts(bundle, store), spark)
    before = raw_values(store)
    with pytest.raises(Exception, match="injected failure"):
        run_prefill(opts(bundle, store, fail_after_users=100, batch_users=50), spark)
    assert current_version_id(store) == first["version_id"]
    assert list((store / "staging").iterdir()) == []
    assert [p.name for p in (store / "versions").iterdir()] == [first["version_id"]]
    assert raw_values(store) == before


def test_many_input_files_and_bad_input(bundle: dict, spark: object) -> None:
    hist = pq.read_table(bundle["data"] / "histories.parquet")
    many = bundle["tmp"] / "many"
    many.mkdir()
    for i, lo in enumerate(range(0, hist.num_rows, 150)):  # 5 files, unsorted file order on purpose
        pq.write_table(hist.slice(lo, 150), many / f"h-{(i * 3) % 5}.parquet")
    store = bundle["tmp"] / "many-store"
    m = run_prefill(PrefillOptions(checkpoint=str(bundle["ckpt"]), histories=str(many), store=str(store),
                                   spark_log_level=None, command_line="test", batch_users=64), spark)
    assert m["users"] == hist.num_rows
    res = verify_store(store, bundle["ckpt"], many)
    assert res.ok, res.mismatches
    bad = bundle["tmp"] / "bad"
    bad.mkdir()
    pq.write_table(hist.drop_columns(["labels"]), bad / "h.parquet")
    with pytest.raises(PrefillInputError, match=r"bad/h.parquet.*missing column 'labels'"):
        run_prefill(PrefillOptions(checkpoint=str(bundle["ckpt"]), histories=str(bad / "h.parquet"),
                                   store=str(bundle["tmp"] / "bad-store"), spark_log_level=None), spark)
    shutil.rmtree(bad)
    bad.mkdir()
    pq.write_table(hist.set_column(1, "items", pa.array(["x"] * hist.num_rows)), bad / "h.parquet")
    with pytest.raises(PrefillInputError, match="column 'items' has type string"):
        run_prefill(PrefillOptions(checkpoint=str(bundle["ckpt"]), histories=str(bad),
                                   store=str(bundle["tmp"] / "bad-store"), spark_log_level=None), spark)
    with pytest.raises(PrefillInputError, match="no such file"):
        run_prefill(PrefillOptions(checkpoint=str(bundle["ckpt"]), histories=str(bundle["tmp"] / "nope"),
                                   store=str(bundle["tmp"] / "bad-store"), spark_log_level=None), spark)
