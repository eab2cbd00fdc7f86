"""The store built from the per-partition prefill function's output (no Spark): the manifest and the files it
links, `ckv store verify` (passes, and catches other histories, missing users and another model), the size
report's compression rates, StoreReader on the records, and `ckv store build` from a prefill Parquet directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.model.cache_spec import bytes_per_behaviour, compression_rate
from collectivekv.pipeline.prefill.prefill import cache_layout
from collectivekv.pipeline.reports.size_report import size_report
from collectivekv.pipeline.store.store_ops import build_store
from collectivekv.pipeline.store.verify import verify_store
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.pipeline.prefill.prefill_helpers import LENGTHS, histories, make_model, small_config, write_prefill


@pytest.fixture()
def small_store(tmp_path: Path) -> dict:
    model = make_model(small_config(max_len=6))
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    layout = cache_layout(model.cfg, version)
    parts = [histories(LENGTHS, seed=7, first_user=0), histories(LENGTHS[:5], seed=8, first_user=50)]
    hist = tmp_path / "hist"
    hist.mkdir()
    for i, b in enumerate(parts):
        pq.write_table(pa.Table.from_batches([b]), hist / f"h{i}.parquet")
    prefill = {"model_config": dataclasses.asdict(model.cfg), "mode": "collective"}
    manifest = build_store(tmp_path / "store", write_prefill(tmp_path, model, layout, parts), prefill=prefill,
                           command_line="test")
    return {"root": tmp_path, "store": tmp_path / "store", "ckpt": tmp_path / "ckpt", "hist": hist,
            "manifest": manifest, "model": model, "layout": layout, "parts": parts}


def test_build_store_manifest_and_links(small_store: dict) -> None:
    store, m = small_store["store"], small_store["manifest"]
    for key in ("model_version", "dims", "dtypes", "pool_size", "users", "bytes", "created_at", "command_line"):
        assert key in m
    assert m["users"] == len(LENGTHS) + 5
    assert m["dims"]["d_attn"] == 32 and m["dtypes"] == {"kv": "float16", "index": "uint16"}
    assert set(m["bytes"]) >= {"parquet", "lmdb_disk", "payload"}
    assert json.loads((store / "manifest.json").read_text())["version_id"] == m["version_id"]
    assert (store / "lmdb" / "data.mdb").is_file() and (store / "layout.json").is_file()
    assert sorted(p.name for p in (store / "parquet").iterdir()) == [
        "_layout.json", "_prefill.json", "part-0.parquet", "part-1.parquet"]


def test_verify_passes_and_catches_mismatches(small_store: dict, tmp_path: Path) -> None:
    s = small_store
    res = verify_store(s["store"], s["ckpt"], s["hist"])
    assert res.ok, res.mismatches
    assert res.users_checked == len(LENGTHS) + 5
    assert verify_store(s["store"], s["ckpt"], s["hist"], sample=4).users_checked == 4
    # the histories of other users: the records differ from what the model computes
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pa.Table.from_batches([histories(LENGTHS, seed=99, first_user=0),
                                          histories(LENGTHS[:5], seed=8, first_user=50)]), wrong / "h.parquet")
    res = verify_store(s["store"], s["ckpt"], wrong)
    assert not res.ok and any("differs" in m or "length" in m or "idx" in m for m in res.mismatches)
    # a user missing from the store, and a different model
    pq.write_table(pa.Table.from_batches([histories([2], first_user=999)]), wrong / "h2.parquet")
    assert any("no record" in m for m in verify_store(s["store"], s["ckpt"], wrong).mismatches)
    other = tmp_path / "other"
    save_checkpoint(other, make_model(small_config(max_len=6), seed=1), {})
    runner = CliRunner()
    r = runner.invoke(__import__("collectivekv.jobs.store", fromlist=["store"]).store,
                      ["verify", str(s["store"]), "--checkpoint", str(other), "--histories", str(s["hist"])])
    assert r.exit_code == 1 and "store was built by model" in r.output
    r = runner.invoke(__import__("collectivekv.jobs.store", fromlist=["store"]).store,
                      ["verify", str(s["store"]), "--checkpoint", str(s["ckpt"]), "--histories", str(s["hist"])])
    assert r.exit_code == 0 and "OK" in r.output


def test_size_report_cr(small_store: dict) -> None:
    rep = size_report(small_store["store"])["store"]
    cfg = small_store["model"].cfg
    assert rep["cr"]["formula"] == pytest.approx(compression_rate(cfg, 2))
    assert rep["cr"]["payload"] == pytest.approx(compression_rate(cfg, 2))
    assert rep["cr"]["lmdb_disk"] > rep["cr"]["records"] > rep["cr"]["payload"]
    behaviours = sum(min(n, 6) for n in LENGTHS + LENGTHS[:5])
    assert rep["behaviours"] == behaviours
    assert rep["bytes"]["payload"] == behaviours * bytes_per_behaviour(cfg, 2)


def test_store_reader_sees_prefill_records(small_store: dict) -> None:
    with StoreReader.open_current(small_store["store"]) as reader:
        assert len(reader) == len(LENGTHS) + 5
        rec = reader.get(4)
        assert rec is not None and rec.length == 6 and rec.arrays["kv.k_user"].shape == (6, 2)


def test_store_build_cli_from_a_parquet_dir(small_store: dict, tmp_path: Path) -> None:
    from collectivekv.jobs.store import store as store_cli

    src = small_store["store"] / "parquet"
    runner = CliRunner()
    r = runner.invoke(store_cli, ["build", str(src), "--no-progress"])
    assert r.exit_code == 2 and "--store" in r.output
    new = tmp_path / "copy"
    r = runner.invoke(store_cli, ["build", str(src), "--store", str(new), "--no-progress"])
    assert r.exit_code == 0, r.output
    with StoreReader.open_current(new) as a, StoreReader.open_current(small_store["store"]) as b:
        assert [a.get_raw(u) for u in b.iter_users()] == [b.get_raw(u) for u in b.iter_users()]
    assert json.loads((new / "manifest.json").read_text())["dims"]["d_attn"] == 32  # _prefill.json kept
    r = runner.invoke(store_cli, ["build", str(tmp_path), "--no-progress"])
    assert r.exit_code == 1 and "neither a prefill Parquet directory" in r.output
