"""The nightly prefill and the store tools for zoo checkpoints with a real local Spark.

Tiny SIM / SDIM / HSTU checkpoints (tests/model/zoo_helpers.py's config: d_a 32, pool 12, windows 4 / 10) and
48 synthetic users (lengths 0 .. 25, so every window is both partly filled and truncated). One
``spark-submit jobs/prefill.py`` subprocess (SIM, collective) end to end; the other runs use the
session-scoped in-process SparkSession (tests/conftest.py). Checked: Parquet rows + layout +
manifest, ``ckv store verify`` for every user (every K/V group, router indices, retrieval keys), a
byte-identical rerun and rebuild, the full-KV baseline and the size report's CR, corrupted values
failing verify, incremental runs, engines (memo refused, noop sizes), Parquet without a payload refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collectivekv.cachestore.store.entry import (
    EntryLayout,
    decode_entry,
    encode_entry,
    entry_from_parquet_row,
    entry_schema,
)
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, StoreBuildError, build_lmdb, prefill_schema
from collectivekv.cachestore.store.publish import current_version_id
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import write_layout
from collectivekv.jobs.report import report as report_cli
from collectivekv.jobs.store import store as store_cli
from collectivekv.model.cache_spec import compression_rate, entry_bytes
from collectivekv.pipeline.prefill.prefill import OUTPUT_SCHEMA, NoopEngine, ZooEngine, cache_layout, prefill_batches
from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.helpers import run_prefill_submit
from tests.model.zoo_helpers import N_ITEMS, make_model, zoo_config
from tests.store_fixtures import put_in_place

pytestmark = pytest.mark.spark
ROOT = Path(__file__).resolve().parents[3]
N_USERS = 48
LENGTHS = [0, 1, 2, 3, 4, 5, 9, 10, 11, 25] + [int(x) for x in np.random.default_rng(7).integers(1, 26, N_USERS - 10)]


def histories(lengths: list[int], seed: int = 0, extra: dict[int, int] | None = None) -> pa.Table:
    """Histories of users 1000 + i (items 1..N_ITEMS, 0/1 labels); ``extra``: user index → events appended."""
    rng = np.random.default_rng(seed)
    items = [rng.integers(1, N_ITEMS + 1, n).astype(np.int32) for n in lengths]
    labels = [rng.integers(0, 2, n).astype(np.int8) for n in lengths]
    for i, k in (extra or {}).items():
        items[i] = np.concatenate([items[i], rng.integers(1, N_ITEMS + 1, k).astype(np.int32)])
        labels[i] = np.concatenate([labels[i], rng.integers(0, 2, k).astype(np.int8)])
    return pa.table({"user_id": pa.array(np.arange(1000, 1000 + len(lengths)), pa.int64()),
                     "items": pa.array([x.tolist() for x in items], pa.list_(pa.int32())),
                     "labels": pa.array([x.tolist() for x in labels], pa.list_(pa.int8()))})  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Histories (two files) and one tiny untrained checkpoint per arch."""
    tmp = tmp_path_factory.mktemp("zoo-store")
    hist = tmp / "hist"
    hist.mkdir()
    table = histories(LENGTHS)
    pq.write_table(table.slice(0, 30), hist / "a.parquet")
    pq.write_table(table.slice(30), hist / "b.parquet")
    ckpts = {}
    for arch in ("sim", "sdim", "hstu"):
        model = make_model(zoo_config(arch)).eval()
        version = save_checkpoint(tmp / f"ckpt-{arch}", model, {})
        ckpts[arch] = {"path": tmp / f"ckpt-{arch}", "version": version, "cfg": model.cfg, "model": model}
    return {"tmp": tmp, "hist": hist, "table": table, "ckpts": ckpts}


def opts(bundle: dict, arch: str, store: Path, **kw: object) -> PrefillOptions:
    return PrefillOptions(checkpoint=str(bundle["ckpts"][arch]["path"]), histories=str(bundle["hist"]),
                          store=str(store), progress_interval=1.0, spark_log_level=None, command_line="test",
                          **kw)  # fmt: skip


def raw_values(store: Path) -> dict[int, bytes]:
    with StoreReader.open_current(store) as reader:
        return {uid: reader.get_raw(uid) for uid in reader.iter_users()}


def verify_cli(store: Path, bundle: dict, arch: str, histories_path: Path | None = None) -> object:
    return CliRunner().invoke(store_cli, ["verify", str(store), "--checkpoint", str(bundle["ckpts"][arch]["path"]),
                                          "--histories", str(histories_path or bundle["hist"])])


@pytest.fixture(scope="module")
def submitted(bundle: dict) -> dict:
    """`spark-submit --master local[2] jobs/prefill.py` of the SIM checkpoint (collective), once."""
    store = bundle["tmp"] / "sim"
    proc = run_prefill_submit("--checkpoint", str(bundle["ckpts"]["sim"]["path"]), "--histories",
                              str(bundle["hist"]), "--out", str(store), "--batch-users", "16",
                              "--progress-interval", "1")  # fmt: skip
    return {"store": store, "stdout": proc.stdout, "stderr": proc.stderr}


def test_spark_submit_sim_end_to_end(bundle: dict, submitted: dict) -> None:
    store, ck = submitted["store"], bundle["ckpts"]["sim"]
    cfg = ck["cfg"]
    assert "published" in submitted["stdout"] and "engine zoo" in submitted["stderr"]
    m = json.loads((store / "manifest.json").read_text())
    assert m["users"] == N_USERS and m["model_version"] == ck["version"] and m["arch"] == "sim"
    assert m["record_format_version"] == 2 and m["layout"]["layout_version"] == 2
    assert m["dims"]["max_len"] == cfg.window_len == 10 and m["dims"]["d_attn"] == 32 and m["dims"]["d_user"] == 2
    assert m["dtypes"] == {"kv": "float16", "index": "uint16"} and m["k_shared"] and m["v_shared"]
    layout = cache_layout(cfg, ck["version"])
    assert EntryLayout.from_dict(m["layout"]) == layout
    n = np.minimum(np.array(LENGTHS), cfg.window_len)
    assert m["behaviours"] == int(n.sum())
    assert m["bytes"]["payload"] == sum(entry_bytes(cfg, int(k), kv_itemsize=2) for k in n)
    assert m["stats"]["part_rows"] == {p.name: int(np.minimum(n, p.cap).sum()) for p in layout.parts}
    parquet = pq.read_table(store / "parquet")
    assert parquet.schema.names == [*entry_schema().names, "history_fp"] and parquet.num_rows == N_USERS
    assert sorted(parquet.column("length").to_pylist()) == sorted(n.tolist())
    assert list((store / "staging").iterdir()) == []
    r = verify_cli(store, bundle, "sim")
    assert r.exit_code == 0, r.output
    assert f"checked {N_USERS} users" in r.output and "OK" in r.output


@pytest.mark.parametrize("arch", ["hstu", "sdim"])
def test_collective_store_verifies_for_every_user(bundle: dict, spark: object, arch: str) -> None:
    store = bundle["tmp"] / arch
    m = run_prefill(opts(bundle, arch, store, batch_users=16), spark)
    cfg = bundle["ckpts"][arch]["cfg"]
    assert m["users"] == N_USERS and m["arch"] == arch and m["mode"] == "collective"
    names = [p["name"] for p in m["layout"]["parts"]]
    if arch == "hstu":
        assert names == ["layer0.k_user", "layer0.v_user", "layer0.k_idx", "layer0.v_idx", "layer1.k_user",
                         "layer1.v_user", "layer1.k_idx", "layer1.v_idx"]  # fmt: skip
    else:  # SDIM: the long stage caches V only, plus bucket ids (retrieval keys)
        assert "long.k_user" not in names and "long.v_user" in names and names[-1] == "keys.buckets"
    n = np.minimum(np.array(LENGTHS), cfg.window_len)
    assert m["bytes"]["payload"] == sum(entry_bytes(cfg, int(k), kv_itemsize=2) for k in n)
    res = verify_store(store, bundle["ckpts"][arch]["path"], bundle["hist"], batch_users=7)
    assert res.ok and res.users_checked == N_USERS and res.behaviours_checked == int(n.sum()), res.mismatches
    assert 0 < res.max_abs_err < 1e-2


def test_full_baseline_and_size_report(bundle: dict, submitted: dict, spark: object) -> None:
    full = bundle["tmp"] / "sim-full"
    m = run_prefill(opts(bundle, "sim", full, mode="full", kv_dtype="float32"), spark)
    ck = bundle["ckpts"]["sim"]
    cfg = ck["cfg"]
    assert m["mode"] == "full" and m["dtypes"]["index"] is None and m["pool_size"] == 0
    assert all(w in (32, 1) for w in m["dims"]["parts"].values())  # K/V at d_a; 1-byte category masks
    res = verify_store(full, ck["path"], bundle["hist"])
    assert res.ok and res.users_checked == N_USERS, res.mismatches
    r = CliRunner().invoke(report_cli, ["size", str(submitted["store"]), "--baseline", str(full), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    s, b = rep["store"], rep["baseline"]
    assert s["arch"] == "sim" and s["bytes_per_full_window"] == entry_bytes(cfg, kv_itemsize=2)
    assert s["cr"]["formula"] == pytest.approx(compression_rate(cfg, kv_itemsize=2))
    n = np.minimum(np.array(LENGTHS), cfg.window_len)
    full_fp32 = sum(2 * (min(int(k), 4) + int(k)) * 32 * 4 for k in n)  # short (cap 4) + long K and V
    assert s["full_fp32_bytes"] == b["full_fp32_bytes"] == full_fp32
    assert s["cr"]["payload"] == pytest.approx(s["bytes"]["payload"] / full_fp32)
    # the fp32 full-KV baseline holds exactly the full K/V plus the category masks (1 byte per long row)
    assert b["bytes"]["payload"] == full_fp32 + int(n.sum())
    assert b["cr"]["formula"] == pytest.approx(compression_rate(dataclasses.replace(cfg, kv_mode="full")))
    assert rep["vs_baseline"]["same_users"]
    assert rep["vs_baseline"]["payload"] == pytest.approx(s["bytes"]["payload"] / b["bytes"]["payload"])
    assert rep["vs_baseline"]["lmdb_disk"] < 0.5
    table = CliRunner().invoke(report_cli, ["size", str(submitted["store"]), "--baseline", str(full)]).output
    assert "CR formula" in table and "arch (parts)" in table and "sim (5 parts)" in table
    assert s["token_table"]["applies"] and s["token_table"]["vocabulary"] == 2 * cfg.n_items
    assert "token-table alternative" in table
    # the capacity model plans the zoo store from its model config: with the store's own lengths its payload
    # totals are the measured ones, for the CollectiveKV store and for the fp32 full-KV baseline
    from collectivekv.jobs.capacity import capacity

    r = CliRunner().invoke(capacity, ["--store", str(submitted["store"]), "--full-dtype", "float32", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["users"] == N_USERS and plan["collective"]["layout"]["arch"] == "sim"
    assert plan["collective"]["total"]["payload"] == pytest.approx(s["bytes"]["payload"])
    assert plan["full"]["total"]["payload"] == pytest.approx(b["bytes"]["payload"])
    assert plan["collective"]["cr_vs_full_fp32"] == pytest.approx(s["cr"]["formula"])
    r = CliRunner().invoke(capacity, ["--store", str(submitted["store"]), "--d-user", "2"])
    assert r.exit_code != 0 and "applies only to din stores" in r.output


def test_rerun_and_rebuild_are_byte_identical(bundle: dict, submitted: dict, spark: object) -> None:
    store = submitted["store"]
    before = raw_values(store)
    assert len(before) == N_USERS
    old_id = current_version_id(store)
    m = run_prefill(opts(bundle, "sim", store, batch_users=16), spark)  # in-process this time
    assert current_version_id(store) == m["version_id"] != old_id
    assert raw_values(store) == before
    r = CliRunner().invoke(store_cli, ["build", str(store), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert raw_values(store) == before
    assert json.loads((store / "manifest.json").read_text())["arch"] == "sim"


def _corrupt(store: Path, dest: Path, uid: int, edit: object) -> Path:
    """A copy of STORE whose LMDB value of ``uid`` is ``edit(value)``."""
    shutil.copytree(store, dest, symlinks=True)
    with StoreReader.open_current(dest) as reader:
        value = reader.get_raw(uid)
    put_in_place(dest / "current", {uid: edit(value)})
    return dest


def test_corrupted_values_fail_verify(bundle: dict, submitted: dict) -> None:
    store, tmp = submitted["store"], bundle["tmp"]
    layout = cache_layout(bundle["ckpts"]["sim"]["cfg"], bundle["ckpts"]["sim"]["version"])
    uid = 1000 + LENGTHS.index(25)

    def flip(v: bytes) -> bytes:
        return v[:-3] + bytes([v[-3] ^ 0x10]) + v[-2:]

    r = verify_cli(_corrupt(store, tmp / "bad-crc", uid, flip), bundle, "sim")
    assert r.exit_code == 1 and f"user {uid}: CRC mismatch" in r.output and "FAILED: 1 mismatches" in r.output

    def reencode(name: str, value: int) -> object:
        """A record with one part's first row changed, re-encoded with a valid CRC."""
        def edit(v: bytes) -> bytes:
            rec = decode_entry(layout, v)
            parts = [rec.arrays[p.name].copy() for p in layout.parts]
            j = [p.name for p in layout.parts].index(name)
            row = parts[j][0]
            parts[j][0] = (row + value) % layout.pool_size if "idx" in name else row ^ value
            return encode_entry(layout, rec.length, parts)
        return edit

    r = verify_cli(_corrupt(store, tmp / "bad-idx", uid, reencode("long.k_idx", 1)), bundle, "sim")
    assert r.exit_code == 1 and f"user {uid}: long.k_idx at row 0" in r.output, r.output
    r = verify_cli(_corrupt(store, tmp / "bad-key", uid, reencode("keys.categories", 1)), bundle, "sim")
    assert r.exit_code == 1 and f"user {uid}: retrieval key categories at row 0" in r.output, r.output


def test_incremental_zoo_run(bundle: dict, spark: object) -> None:
    store = bundle["tmp"] / "hstu-inc"
    first = run_prefill(opts(bundle, "hstu", store, batch_users=16), spark)
    before = raw_values(store)
    changed = bundle["tmp"] / "hist-changed"
    changed.mkdir()
    pq.write_table(histories(LENGTHS, extra={3: 2, 8: 1}), changed / "h.parquet")  # users 1003, 1008 grew
    m = run_prefill(dataclasses.replace(opts(bundle, "hstu", store, incremental=True), histories=str(changed)),
                    spark)
    inc = m["prefill"]["incremental"]
    assert inc["previous"]["version_id"] == first["version_id"] and inc["previous"]["reusable"]
    assert inc["recomputed"] == 2 and inc["carried"] == N_USERS - 2 and inc["changed_users"] == 2
    after = raw_values(store)
    assert {u for u in before if after[u] != before[u]} == {1003, 1008}
    res = verify_store(store, bundle["ckpts"]["hstu"]["path"], changed)
    assert res.ok and res.users_checked == N_USERS, res.mismatches
    r = verify_cli(store, bundle, "hstu")  # the old histories no longer match the two grown users
    assert r.exit_code == 1 and "user 1003" in r.output and "user 1008" in r.output


def test_engines_and_input_checks(bundle: dict, tmp_path: Path) -> None:
    ck = bundle["ckpts"]["sim"]
    with pytest.raises(ValueError, match="engine 'memo' needs the din arch"):
        run_prefill(opts(bundle, "sim", tmp_path / "memo", engine="memo"))  # refused before Spark starts
    layout = cache_layout(ck["cfg"], ck["version"])
    batches = bundle["table"].to_batches(max_chunksize=20)
    model_out = pa.Table.from_batches(list(prefill_batches(batches, ck["model"], layout, batch_users=8)))
    noop_out = pa.Table.from_batches(list(prefill_batches(batches, NoopEngine(layout), layout)))
    assert model_out.schema == noop_out.schema == OUTPUT_SCHEMA == entry_schema()
    sizes = [len(p) for p in model_out.column("payload").to_pylist()]
    assert [len(p) for p in noop_out.column("payload").to_pylist()] == sizes
    assert sizes == (layout.record_sizes(np.array(model_out.column("length").to_pylist())) - 32).tolist()
    # sub-chunks bounded by padded positions: same rows, values within fp16 rounding
    small = ZooEngine(ck["model"], layout)
    small.max_positions = 12
    chunked = pa.Table.from_batches(list(prefill_batches(batches, small, layout, batch_users=8)))
    assert chunked.column("length").equals(model_out.column("length"))
    for x, y in zip(chunked.to_pylist(), model_out.to_pylist(), strict=True):
        ra, rb = (decode_entry(layout, entry_from_parquet_row(layout, **{k: r[k] for k in entry_schema().names}))
                  for r in (x, y))  # fmt: skip
        for p in layout.parts:
            a, b = ra.arrays[p.name], rb.arrays[p.name]
            if p.kind == "kv":
                np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=1e-5)
            else:
                assert np.array_equal(a, b), p.name
    # Parquet of per-part columns (no payload) is refused naming the missing column
    pdir = tmp_path / "parts-parquet"
    pdir.mkdir()
    parts = pa.schema([(f.name, f.type) for f in prefill_schema() if f.name != "payload"]
                      + [("k_user", pa.binary()), ("v_user", pa.binary())])  # fmt: skip
    pq.write_table(pa.Table.from_pylist([], schema=parts), pdir / "part-0.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    with pytest.raises(StoreBuildError, match="missing column 'payload'"):
        build_lmdb(pdir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arch", "variant", "mode", "kv_dtype"), [
    ("eta", "collective", "collective", "bfloat16"), ("twin", "share_k", "collective", "float16"),
    ("sdim", "share_v", "full", "float16"), ("hstu", "full", "full", "float32"), ("eta", "full", "full", "float16"),
])  # fmt: skip
def test_prefill_batches_store_verify_without_spark(tmp_path: Path, arch: str, variant: str, mode: str,
                                                    kv_dtype: str) -> None:
    """The executors' per-partition function → Parquet → `ckv store build` → verify, for the other archs,
    partial sharing, full-KV checkpoints and every kv dtype (no Spark: fast)."""
    from collectivekv.pipeline.store.store_ops import build_store
    from tests.model.zoo_helpers import VARIANTS

    model = make_model(zoo_config(arch, **VARIANTS[variant])).eval()
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    layout = cache_layout(model.cfg, version, mode, kv_dtype)
    table = histories(LENGTHS[:20], seed=3)
    out = pa.Table.from_batches(list(prefill_batches(table.to_batches(max_chunksize=8), model, layout, 5)))
    pdir = tmp_path / "parquet"
    pdir.mkdir()
    pq.write_table(out.slice(10), pdir / "part-1.parquet")
    pq.write_table(out.slice(0, 10).take(pa.array(range(9, -1, -1))), pdir / "part-0.parquet")  # unsorted: spill
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    m = build_store(tmp_path / "store", pdir)
    assert m["users"] == 20 and m["record_format_version"] == 2 and m["stats"]["sorted_input"] is False
    hist = tmp_path / "h.parquet"
    pq.write_table(table, hist)
    res = verify_store(tmp_path / "store", tmp_path / "ckpt", hist)
    assert res.ok and res.users_checked == 20, res.mismatches


def test_html_report_of_a_zoo_store(bundle: dict, submitted: dict, tmp_path: Path) -> None:
    """`ckv report html` on a zoo store: size section with the store's CR and the token-table alternative, the
    capacity section planned from the store's model config."""
    from collectivekv.pipeline.reports.html_report import build_report

    page = build_report(submitted["store"], bundle["ckpts"]["sim"]["path"], histories=bundle["hist"],
                        analysis_users=8)  # fmt: skip
    assert "<h2 id='size'>" in page and "<h2 id='latency'>" in page and "token-table alternative" in page
    assert "This store&#x27;s users (" in page or "This store's users (" in page
    assert "Projection to" in page
