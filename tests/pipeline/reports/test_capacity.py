"""`ckv capacity` (pipeline/reports/capacity.py, pipeline/reports/capacity_inputs.py, jobs/capacity.py): the arithmetic
against hand-computed values, the LMDB page model against real LMDB files, and the calibration of the
whole prediction against real stores built by the prefill job's function on the bundled MovieLens data."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.store.record import HEADER_SIZE
from collectivekv.jobs.capacity import capacity as capacity_cmd
from collectivekv.model.cache_spec import bytes_per_behaviour, compression_rate
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.pipeline.reports.capacity import (
    Bandwidth,
    Budgets,
    CacheFormat,
    LengthDist,
    capacity_plan,
    dist_from_lengths,
    dist_from_quantiles,
    parse_quantiles,
)
from collectivekv.pipeline.reports.capacity_inputs import (
    bandwidth,
    histories_lengths,
    measured_bandwidth,
    read_results,
    store_calibration,
    store_format,
    store_lengths,
)
from collectivekv.pipeline.reports.capacity_table import capacity_table, format_table
from collectivekv.pipeline.reports.lmdb_pages import lmdb_bytes, lmdb_node_max
from tests.store_fixtures import build_store as build_fixture_store

REPO = Path(__file__).resolve().parents[3]
MOVIELENS = REPO / "data" / "movielens"
VERSION = "00112233445566ff"
TOL = 0.05  # calibration target: the plan within 5% of a built store (docs/capacity.md)


def point(n: int) -> LengthDist:
    return LengthDist(np.array([n]), np.array([1.0]), f"all users at {n}")


# ------------------------------------------------------------------------------------ arithmetic
def test_paper_and_our_compression_examples() -> None:
    """The paper's setting: fp32 user values + int32 indices, d_u 1 = 16 B of 2,048 B = 0.78%;
    ours: fp16 + uint16 = 8 B = 0.39%; d_u 4 fp16 = 20 B = 0.98%."""
    paper = CacheFormat(d_attn=256, d_user=1, pool_size=10_000, kv_dtype="float32", index_dtype="int32")
    assert paper.collective_bytes_per_behaviour() == 16
    plan = capacity_plan(1, point(1000), paper)
    assert plan["collective"]["cr_vs_full_fp32"] == pytest.approx(16 / 2048) == pytest.approx(0.0078125)
    assert plan["full"]["bytes_per_behaviour"] == 2048 and plan["full"]["cr_vs_full_fp32"] == 1.0
    ours = CacheFormat(d_attn=256, d_user=1, pool_size=10_000)
    assert ours.idx_dtype == "uint16"
    plan = capacity_plan(1, point(1000), ours)
    assert plan["collective"]["bytes_per_behaviour"] == 8
    assert plan["collective"]["cr_vs_full_fp32"] == pytest.approx(0.00390625)
    assert plan["full"]["bytes_per_behaviour"] == 1024  # full KV at the same fp16
    d4 = CacheFormat(d_user=4)
    assert capacity_plan(1, point(10), d4)["collective"]["cr_vs_full_fp32"] == pytest.approx(20 / 2048)
    # the same numbers as model.cache's arithmetic (the CR the README and the size report use)
    for share_k, share_v, d_user, pool in ((True, True, 1, 10_000), (True, False, 3, 100), (False, True, 2, 70_000)):
        fmt = CacheFormat(d_user=d_user, pool_size=pool, share_k=share_k, share_v=share_v)
        cfg = ModelConfig(n_items=1, d_attn=256, collective=CollectiveConfig(d_user=d_user, pool_size=pool,
                                                                             share_k=share_k, share_v=share_v))
        assert fmt.collective_bytes_per_behaviour() == bytes_per_behaviour(cfg, 2)
        got = capacity_plan(1, point(5), fmt)["collective"]["cr_vs_full_fp32"]
        assert got == pytest.approx(compression_rate(cfg, 2))


def test_capacity_totals_pool_transfer_and_fits_by_hand() -> None:
    users, n, b = 1_000_000, 50, 512
    bw = Bandwidth(50.0, 20.0, "test")
    plan = capacity_plan(users, point(n), CacheFormat(), batch=b, bandwidth=bw, budgets=Budgets(64.0, 80.0))
    c, f = plan["collective"], plan["full"]
    assert c["per_user"]["payload"] == 400 and c["per_user"]["records"] == 432
    assert c["total"]["payload"] == users * 400 and c["total"]["records"] == users * 432
    assert f["per_user"]["records"] == HEADER_SIZE + 50 * 1024
    # pool: K and V, 10,000 rows of (256 - 1) fp32 values each
    assert c["gpu_pool_bytes"] == 2 * 10_000 * 255 * 4 == 20_400_000 and f["gpu_pool_bytes"] == 0
    # batch = 16 B/user (offsets, lengths) + zero block (8) + records 8-aligned: the serving benchmark's bytes
    # (benchmarks/results/decode_latency/decode_latency_cpu_dryrun.json, fetch, L 50, B 512: 229,384 B)
    assert c["batch"]["bytes_mean"] == 512 * (432 + 16) + 8 == 229_384
    assert c["batch"]["ms_mean"] == pytest.approx(229_384 / 50e9 * 1e3 + 0.020)
    big = capacity_plan(1, point(1000), CacheFormat(), batch=b)["collective"]["batch"]
    assert big["bytes_mean"] == 4_120_584  # the benchmark's L 1000, B 512 fetch bytes
    assert f["batch"]["bytes_mean"] == 512 * (32 + 51_200 + 16) + 512  # zero block = widest part (256 fp16)
    from collectivekv.cachestore.decode.batch import zero_block_bytes
    from collectivekv.pipeline.reports.capacity import zero_block

    for lay in CacheFormat(d_user=3, share_v=False).layouts().values():
        assert zero_block(lay) == zero_block_bytes(lay)
    # LMDB: 432-byte records, 450-byte nodes (+2 slot) → 9 per 4,080-byte page
    leaf = math.ceil(users / 9)
    assert c["lmdb_model"]["leaf_pages"] == pytest.approx(leaf, rel=1e-3)
    fits = c["fits"]
    assert fits["host_users"] == int(64 * 2**30 // c["per_user"]["lmdb_disk"])
    assert fits["gpu_users"] == int((80 * 2**30 - 20_400_000) // (432 + 16))
    assert c["shards"] == {"hosts": 1, "gpus": 1}  # a million users fit one host / GPU
    many = capacity_plan(10**9, point(n), CacheFormat(), batch=b, bandwidth=bw, budgets=Budgets(64.0, 80.0))
    for col in ("collective", "full"):
        per_gpu = plan[col]["fits"]["gpu_users"]
        assert many[col]["shards"]["gpus"] == math.ceil(10**9 / per_gpu)
    assert many["collective"]["shards"]["gpus"] == 6 and many["full"]["shards"]["gpus"] == 597
    assert plan["paper_padded_fp32_batch_bytes"] == 512 * 50 * 2 * 256 * 4
    text = format_table(capacity_table(plan))
    assert "GPU-resident pool" in text and "users fitting" in text and "bandwidth: test" in text
    assert "shards = GPUs of 80 GiB" in text


# ------------------------------------------------------------------------------- length dists
def test_quantile_fit_matches_p50_p90_and_is_truncated() -> None:
    d = dist_from_quantiles(150, 122, 253, 1000)  # the paper's MicroVideo (Appendix G)
    assert abs(d.quantile(0.5) - 122) <= 1 and abs(d.quantile(0.9) - 253) <= 2
    assert d.max == 1000 and d.lengths.min() == 1 and d.probs.sum() == pytest.approx(1)
    assert "log-normal" in d.note and "truncated at max 1000" in d.note and "given mean 150" in d.note
    assert d.clip(200).max == 200 and d.clip(200).mean < d.mean and "clipped at max_len 200" in d.clip(200).note
    assert parse_quantiles("10, 8, 20, 100") == (10.0, 8.0, 20.0, 100)
    for bad in ("1,2,3", "a,b,c,d", "10,30,20,100", "10,5,20,15"):
        with pytest.raises(ValueError):
            parse_quantiles(bad)


def test_empirical_distribution_sample_is_its_multiset() -> None:
    lengths = np.random.default_rng(0).integers(0, 300, 777)
    d = dist_from_lengths(lengths, "x")
    assert d.observed_users == 777 and d.mean == pytest.approx(lengths.mean())
    assert np.array_equal(np.sort(d.sample(777, seed=3)), np.sort(lengths))


# ----------------------------------------------------------------------------- LMDB page model
def _lmdb_file(tmp: Path, sizes: np.ndarray) -> int:
    shutil.rmtree(tmp, ignore_errors=True)
    env = lmdb.open(str(tmp), map_size=1 << 30, readahead=False, meminit=False, max_dbs=0)
    with env.begin(write=True) as txn:
        txn.cursor().putmulti(((int(i).to_bytes(8, "big"), b"x" * int(s)) for i, s in enumerate(sizes)), append=True)
    env.sync(True)
    env.close()
    st = (tmp / "data.mdb").stat()
    return st.st_blocks * 512


def test_lmdb_page_model_is_exact(tmp_path: Path) -> None:
    g = np.random.default_rng(1)
    nodemax = lmdb_node_max()
    assert nodemax == 2038
    cases = {
        "small": np.full(3000, 32 + 50 * 8),
        "mixed": 32 + 8 * g.integers(0, 1001, 4000),
        "overflow": 32 + 1024 * g.integers(1, 60, 300),
        "edges": np.array([nodemax - 16, nodemax - 15, nodemax - 17, nodemax - 14] * 200),
        "empty_records": np.full(5000, 32),
    }
    for name, sizes in cases.items():
        assert lmdb_bytes(sizes) == _lmdb_file(tmp_path / name, sizes), name


# ---------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def movielens_stores(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bundled MovieLens histories → a tiny checkpoint's prefill (the Spark job's per-partition
    function) → stores published by pipeline.store.store_ops.build_store: collective fp16 and full fp16
    (d_a 16: full records of > 31 behaviours spill to overflow pages) at max_len 200, and collective fp32."""
    from collectivekv.pipeline.data.prepare import PrepareConfig, prepare
    from collectivekv.pipeline.prefill.prefill import prefill_batches
    from collectivekv.pipeline.prefill.prefill_engines import cache_layout
    from collectivekv.pipeline.store.store_ops import build_store
    from tests.model.test_model import make_model

    root = tmp_path_factory.mktemp("capacity")
    data = root / "data"
    meta = prepare(PrepareConfig(events=MOVIELENS / "ratings.csv", items=MOVIELENS / "movies.csv", out=data,
                                 rating_col="rating", rating_threshold=4.0))
    c = meta["counts"]
    cfg = ModelConfig(n_items=c["items"], n_genres=c["genres"], max_genres=c.get("max_genres", 10), embed_dim=8,
                      d_attn=16, n_heads=2, max_len=200, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=64))
    model = make_model(cfg, seed=0).eval()
    table = pq.read_table(data / "histories.parquet", columns=["user_id", "items", "labels"])
    stores = {}
    for name, mode, kv in (("collective", "collective", "float16"), ("full", "full", "float16"),
                           ("collective32", "collective", "float32")):
        layout = cache_layout(cfg, VERSION, mode, kv)
        pdir = root / f"pq-{name}"
        pdir.mkdir()
        with torch.no_grad():
            out = list(prefill_batches(table.to_batches(max_chunksize=256), model, layout))
        pq.write_table(pa.Table.from_batches(out), pdir / "part-00000.parquet")
        from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
        from collectivekv.cachestore.store.record import write_layout

        write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
        build_store(root / name, pdir, prefill={"model_config": {"d_attn": 16, "collective": {"d_user": 1}}},
                    command_line="test")
        stores[name] = root / name
    return {"data": data, "stores": stores}


def _measured(store: Path) -> dict:
    from collectivekv.pipeline.reports.size_report import store_sizes

    return store_sizes(store)["bytes"]


@pytest.mark.parametrize("name", ["collective", "full", "collective32"])
def test_calibration_prediction_within_5_percent_of_real_store(movielens_stores: dict, name: str) -> None:
    """Predict the store's size from its own length distribution: payload and records exact, LMDB on
    disk from the page model alone (not from the store's measured factor) within 5% (in fact < 1%; exact
    in key order)."""
    store = movielens_stores["stores"][name]
    got = _measured(store)
    dist, fmt, cal = store_lengths(store), store_format(store), store_calibration(store)
    assert fmt.d_attn == 16 and fmt.max_len == 200
    plan = capacity_plan(cal.users, dist, fmt)  # no calibration: the pure model
    col = plan[cal.mode]
    for key in ("payload", "records", "lmdb_disk"):
        err = col["total"][key] / got[key] - 1
        assert abs(err) < TOL, (name, key, err)
    assert col["total"]["payload"] == pytest.approx(got["payload"], rel=1e-9)
    assert col["total"]["records"] == pytest.approx(got["records"], rel=1e-9)
    assert abs(col["total"]["lmdb_disk"] / got["lmdb_disk"] - 1) < 0.01  # sampled order: ±1 page here
    # the store's own record sizes in key order: the page model gives data.mdb to the byte
    t = pq.read_table(store / "parquet", columns=["user_id", "length"]).sort_by("user_id")
    per = store_format(store).layouts()[cal.mode].record_size(1) - HEADER_SIZE
    assert lmdb_bytes(HEADER_SIZE + t.column("length").to_numpy().astype(np.int64) * per) == got["lmdb_disk"]
    if name == "full":
        assert col["lmdb_model"]["overflow_pages"] > 0  # the page model's overflow path was exercised
    # with the store as calibration, the measured-overhead row reproduces the measurement
    cal_plan = capacity_plan(cal.users, dist, fmt, calibration=cal)
    assert cal_plan[cal.mode]["total"]["lmdb_disk_measured_overhead"] == pytest.approx(got["lmdb_disk"])


def test_calibration_from_the_histories_file(movielens_stores: dict) -> None:
    """Independent of the store: lengths from the histories Parquet, clipped at the store's max_len."""
    store = movielens_stores["stores"]["collective"]
    got = _measured(store)
    dist = histories_lengths(movielens_stores["data"])
    assert dist.observed_users == 671 and dist.max > 200
    plan = capacity_plan(671, dist, store_format(store))
    for key in ("payload", "records", "lmdb_disk"):
        assert abs(plan["collective"]["total"][key] / got[key] - 1) < TOL


def test_page_model_on_fixture_store_with_overflow(tmp_path: Path) -> None:
    """A store of the tests' own fixture builder with paper-width full records (1 KiB a behaviour)."""
    g = np.random.default_rng(7)
    layout = dataclasses.replace(CacheFormat(d_attn=256, max_len=60).layouts()["full"], model_version=VERSION)
    lengths = g.integers(0, 61, 150)
    rows = []
    for uid, n in enumerate(lengths):
        payload = g.bytes(int(n) * 512) + g.bytes(int(n) * 512)  # K | V at fp16, d_a 256
        rows.append({"user_id": uid, "length": int(n), "payload": payload, "model_version": VERSION,
                     "checksum": zlib.crc32(payload)})
    build_fixture_store(tmp_path, rows, layout)
    got = _measured(tmp_path)
    plan = capacity_plan(150, store_lengths(tmp_path), store_format(tmp_path))
    assert plan["full"]["total"]["lmdb_disk"] == pytest.approx(got["lmdb_disk"], rel=0.01)


# --------------------------------------------------------------------------- bandwidth and CLI
def test_bandwidth_measured_or_labelled_fallback(tmp_path: Path) -> None:
    bw = measured_bandwidth(tmp_path)
    assert not bw.measured and bw.gb_per_s == 51.0 and bw.fixed_us == 20.0
    assert "published H100" in bw.source and "fallback" in bw.source and "is missing" in bw.source
    (tmp_path / "decode_latency").mkdir()
    (tmp_path / "decode_latency/decode_latency.json").write_text(json.dumps({"dry_run": True, "copy_limits": {}}))
    assert "dry run" in measured_bandwidth(tmp_path).source
    (tmp_path / "decode_latency/decode_latency.json").write_text(json.dumps({
        "dry_run": False, "machine": {"gpu": "NVIDIA H100 80GB HBM3"},
        "copy_limits": {"pinned": {"large": {}}, "floor_gb_per_s": 53.2, "floor_fixed_ms": 0.018}}))
    bw = measured_bandwidth(tmp_path)
    assert bw.measured and bw.gb_per_s == 53.2 and bw.fixed_us == pytest.approx(18.0)
    assert "H100" in bw.source and "pinned" in bw.source
    assert bandwidth("25", tmp_path).gb_per_s == 25.0
    assert bandwidth("measured", tmp_path, fixed_us=5.0).fixed_us == 5.0
    with pytest.raises(ValueError):
        bandwidth("fast", tmp_path)


def test_library_reads_no_results_unless_given_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No directory: no benchmark file is read (the repository's benchmarks/results included), even from
    a working directory that holds one; the CLI's default is benchmarks/results of the working directory."""
    results = tmp_path / "benchmarks" / "results"
    (results / "decode_latency").mkdir(parents=True)
    (results / "decode_latency/decode_latency.json").write_text(json.dumps({
        "dry_run": False, "machine": {"gpu": "G"}, "copy_limits": {"floor_gb_per_s": 40.0, "floor_fixed_ms": 0.01}}))
    monkeypatch.chdir(tmp_path)
    bw = measured_bandwidth(None)
    assert not bw.measured and "no benchmark results directory" in bw.source
    assert all(v is None for v in read_results(None).values())
    assert measured_bandwidth(results).gb_per_s == 40.0
    res = CliRunner().invoke(capacity_cmd, ["--users", "1000", "--length-dist", "150,122,253,1000", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["bandwidth"]["gb_per_s"] == 40.0  # benchmarks/results of the cwd


def test_cli_capacity(movielens_stores: dict, tmp_path: Path) -> None:
    store = movielens_stores["stores"]["collective"]
    runner = CliRunner()
    res = runner.invoke(capacity_cmd, ["--length-dist", str(store), "--json", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["users"] == 671 and plan["collective"]["calibration"]["users"] == 671
    assert plan["bandwidth"]["measured"] is False
    res = runner.invoke(capacity_cmd, ["--users", "100000000", "--length-dist", "150,122,253,1000", "--dtype",
                                       "float32", "--index-dtype", "int32", "--bandwidth", "50",
                                       "--json-out", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "0.781%" in res.output and "log-normal" in res.output
    assert json.loads((tmp_path / "c.json").read_text())["collective"]["bytes_per_behaviour"] == 16
    res = runner.invoke(capacity_cmd, ["--length-dist", "1,2,3"])
    assert res.exit_code == 1 and "mean,p50,p90,max" in res.output
    res = runner.invoke(capacity_cmd, ["--length-dist", "150,122,253,1000"])
    assert res.exit_code == 1 and "--users" in res.output
    res = runner.invoke(capacity_cmd, ["--store", str(store / "current")])  # a version directory
    assert res.exit_code == 1 and "not a store root" in res.output


@pytest.mark.parametrize("option", [["--max-len", "0"], ["--d-attn", "-16"], ["--host-mem-gib", "-1"],
                                    ["--latency-us", "-100"], ["--batch", "0"]])
def test_cli_capacity_refuses_values_out_of_range(option: list[str]) -> None:
    res = CliRunner().invoke(capacity_cmd, ["--users", "10", *option])
    assert res.exit_code == 2 and f"Invalid value for '{option[0]}'" in res.output


def test_report_size_refuses_a_d_attn_that_contradicts_the_store(movielens_stores: dict) -> None:
    from collectivekv.jobs.report import report

    store = movielens_stores["stores"]["collective"]
    d_a = json.loads(CliRunner().invoke(report, ["size", str(store), "--json"]).output)["store"]["d_attn"]
    res = CliRunner().invoke(report, ["size", str(store), "--d-attn", str(d_a + 1)])
    assert res.exit_code == 1 and f"contradicts the store's d_attn {d_a}" in res.output
    assert CliRunner().invoke(report, ["size", str(store), "--d-attn", str(d_a)]).exit_code == 0


def test_cli_capacity_users_alone_uses_the_stated_default_lengths(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(capacity_cmd, ["--users", "300000000", "--results-dir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    given = runner.invoke(capacity_cmd, ["--users", "300000000", "--length-dist", "150,122,253,1000",
                                         "--results-dir", str(tmp_path), "--json"])
    assert json.loads(given.output)["collective"] == plan["collective"]  # the default is exactly these numbers
    table = runner.invoke(capacity_cmd, ["--users", "300000000", "--results-dir", str(tmp_path)]).output
    assert "default length distribution 150,122,253,1000" in table and "MicroVideo" in table
    res = runner.invoke(capacity_cmd, ["--results-dir", str(tmp_path)])
    assert res.exit_code == 1 and "--users" in res.output
