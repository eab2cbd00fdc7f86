"""Incremental prefill (pipeline/prefill/incremental.py): same LMDB values as a full prefill, fewer users computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.model.config import CollectiveConfig, ModelConfig
from collectivekv.model.zoo import create_model
from collectivekv.pipeline.data.synthetic import HISTORIES_SCHEMA, history_batches
from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
from collectivekv.pipeline.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.spark
N_ITEMS, MAX_LEN = 300, 20


def checkpoint(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=N_ITEMS, embed_dim=8, d_attn=16, n_heads=2, max_len=MAX_LEN, mlp_dims=(8,),
                      collective=CollectiveConfig(d_user=1, pool_size=32))
    return save_checkpoint(path, create_model(cfg).eval(), {})


def day1_day2(tmp: Path) -> tuple[Path, Path, dict]:
    """Day 1: 600 users. Day 2: users 0..99 got new events, 100..149 disappeared, 600..649 are new,
    150..165 have the same window but are otherwise untouched (unchanged), the rest unchanged."""
    t1 = pa.Table.from_batches(list(history_batches(600, n_items=N_ITEMS, max_len=60, seed=1, chunk_users=200)))
    rows = t1.to_pylist()
    rng = np.random.default_rng(5)
    day2 = []
    for r in rows:
        uid = r["user_id"]
        if 100 <= uid < 150:
            continue
        if uid < 100:
            k = int(rng.integers(1, 4))
            r = {**r, "items": r["items"] + rng.integers(1, N_ITEMS + 1, k).tolist(),
                 "timestamps": r["timestamps"] + [r["timestamps"][-1] + i + 1 for i in range(k)],
                 "labels": r["labels"] + rng.integers(0, 2, k).tolist()}
        day2.append(r)
    new = pa.Table.from_batches(list(history_batches(50, n_items=N_ITEMS, max_len=60, seed=2, first_user=600)))
    day2 += new.to_pylist()
    rng.shuffle(day2)
    d1, d2 = tmp / "day1", tmp / "day2"
    d1.mkdir()
    d2.mkdir()
    pq.write_table(t1, d1 / "part-0.parquet")
    t2 = pa.Table.from_pylist(day2, schema=HISTORIES_SCHEMA)
    pq.write_table(t2.slice(0, 300), d2 / "part-0.parquet")
    pq.write_table(t2.slice(300), d2 / "part-1.parquet")
    return d1, d2, {"changed": 100, "new": 50, "dropped": 50, "users": 600}


def raw_values(store: Path) -> dict[int, bytes]:
    with StoreReader.open_current(store) as reader:
        return {uid: reader.get_raw(uid) for uid in reader.iter_users()}


def run(spark, ckpt: Path, hist: Path, store: Path, **kw) -> dict:  # noqa: ANN001
    return run_prefill(PrefillOptions(checkpoint=str(ckpt), histories=str(hist), store=str(store),
                                      progress_interval=1.0, spark_log_level=None, command_line="test", **kw),
                       spark=spark)


def test_incremental_equals_full_and_skips_unchanged(spark, tmp_path: Path) -> None:  # noqa: ANN001
    ckpt = tmp_path / "ckpt"
    checkpoint(ckpt, seed=0)
    d1, d2, expect = day1_day2(tmp_path)
    inc_store, full_store = tmp_path / "inc", tmp_path / "full"
    first = run(spark, ckpt, d1, inc_store, incremental=True)  # no previous store yet: a full prefill
    assert first["prefill"]["incremental"]["previous"]["reusable"] is False
    assert first["prefill"]["incremental"]["recomputed"] == expect["users"]

    man = run(spark, ckpt, d2, inc_store, incremental=True)
    inc = man["prefill"]["incremental"]
    assert inc["previous"]["reusable"] is True and inc["previous"]["version_id"] == first["version_id"]
    assert inc["recomputed"] == expect["changed"] + expect["new"]
    assert inc["changed_users"] == expect["changed"] and inc["new_users"] == expect["new"]
    assert inc["carried"] == expect["users"] - expect["changed"] - expect["dropped"]
    assert inc["dropped"] == expect["dropped"]
    assert man["users"] == expect["users"] - expect["dropped"] + expect["new"]
    version = Path(inc_store / "current").resolve()
    on_disk = json.loads((version / "manifest.json").read_text())["prefill"]["incremental"]
    assert on_disk == inc and json.loads((version / "parquet" / "_prefill.json").read_text())["incremental"] == inc

    full = run(spark, ckpt, d2, full_store)
    assert "incremental" not in full["prefill"]
    a, b = raw_values(inc_store), raw_values(full_store)
    assert sorted(a) == sorted(b) and len(a) == man["users"]
    assert all(a[u] == b[u] for u in a)  # every LMDB value byte-identical to the full prefill's

    # nothing changed since: nothing recomputed, same values again
    again = run(spark, ckpt, d2, inc_store, previous=str(inc_store), incremental=True)
    assert again["prefill"]["incremental"]["recomputed"] == 0
    assert again["prefill"]["incremental"]["carried"] == man["users"]
    assert raw_values(inc_store) == b

    # a new model version forces a full prefill
    ckpt2 = tmp_path / "ckpt2"
    checkpoint(ckpt2, seed=1)
    forced = run(spark, ckpt2, d2, inc_store, incremental=True)
    finc = forced["prefill"]["incremental"]
    assert finc["previous"]["reusable"] is False and "model version changed" in finc["previous"]["reason"]
    assert finc["recomputed"] == man["users"] and finc["carried"] == 0
    forced_values = raw_values(inc_store)
    assert sorted(forced_values) == sorted(b) and all(forced_values[u] != b[u] for u in b if len(b[u]) > 64)


def test_a_store_rebuilt_without_fingerprints_is_not_reused(tmp_path: Path) -> None:
    """`ckv store build` from Parquet without history_fp: the next incremental prefill is a full one, named so
    (no Spark needed to decide it); a `current` pointing outside the store is never followed."""
    import os

    from collectivekv.cachestore.store.entry import layout_from_dict
    from collectivekv.cachestore.store.publish import open_current
    from collectivekv.pipeline.prefill.incremental import previous_state
    from collectivekv.pipeline.store.store_ops import build_store
    from tests.cachestore.store.test_lmdb_store import make_rows, shuffled_parts, write_parquet

    rows = make_rows(list(range(1, 21)), seed=1)
    write_parquet(tmp_path / "pq", rows, parts=shuffled_parts(list(rows), 2))
    store = tmp_path / "store"
    manifest = build_store(store, tmp_path / "pq", command_line="t")
    layout = layout_from_dict(json.loads((open_current(store) / "manifest.json").read_text())["layout"])
    prev = previous_state(store, manifest["model_version"], layout)
    assert prev.parquet is None and prev.reason == "previous Parquet has no history fingerprints"
    (store / "current").unlink()
    os.symlink(str(tmp_path / "pq"), store / "current")
    prev = previous_state(store, manifest["model_version"], layout)
    assert prev.parquet is None and "refusing to follow it" in prev.reason
