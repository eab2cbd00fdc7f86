"""A log with text user and item ids (hex hashes, SKUs) and ISO-8601 times, tab-separated under an extension
pandas does not know: `ckv data prepare --sep tab` → `ckv train` (1 epoch) → prefill (in-process Spark) →
`ckv store verify` → `ckv score` with the raw text ids, as a production log names them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.user_keys import BLAKE2B_63, key_of, read_key_scheme, to_keys
from collectivekv.jobs.cli import main
from collectivekv.pipeline.data.dataset_schema import load_dataset
from collectivekv.pipeline.prefill.spark_job import PrefillOptions, run_prefill
from tests.server_fixtures import start_server

pytestmark = pytest.mark.spark
TINY = ["--embed-dim", "8", "--d-attn", "16", "--heads", "2", "--pool-size", "32", "--max-len", "10",
        "--epochs", "1", "--batch-size", "256", "--no-progress"]  # fmt: skip


def _log(tmp: Path) -> tuple[Path, list[str], list[str]]:
    """40 users (sha1 hex ids) × 15 events over 24 SKUs, ISO times, a 0/1 click; tab-separated `.log`."""
    rng = np.random.default_rng(3)
    users = [hashlib.sha1(f"user{u}".encode()).hexdigest() for u in range(40)]
    items = [f"SKU-{i:04d}" for i in range(24)]
    rows = []
    for u, user in enumerate(users):
        for e in range(15):
            item = int(rng.integers(0, 24))
            when = pd.Timestamp("2024-03-01T00:00:00Z") + pd.Timedelta(minutes=97 * e + u)
            rows.append((user, items[item], when.strftime("%Y-%m-%dT%H:%M:%SZ"), int((item + u) % 3 == 0)))
    path = tmp / "clicks.log"
    pd.DataFrame(rows, columns=["visitor", "sku", "ts", "clicked"]).to_csv(path, sep="\t", index=False)
    return path, users, items


def _prepare_and_train(runner: CliRunner, log: Path, users: list[str], items: list[str], data: Path,
                       ckpt: Path) -> None:
    """`ckv data prepare --sep tab` of the log (text ids hashed to keys, ISO times) into ``data``, then `ckv train`."""
    res = runner.invoke(main, ["data", "prepare", "--events", str(log), "--sep", "tab", "--user-col", "visitor",
                               "--item-col", "sku", "--time-col", "ts", "--label-col", "clicked", "--out", str(data)])
    assert res.exit_code == 0, res.output
    ds = load_dataset(data)
    assert ds.meta["user_key"] == ds.meta["item_key"] == BLAKE2B_63
    assert ds.meta["time"] == {"column": "ts", "input": "iso-8601", "unit": "s"}
    assert sorted(ds.histories["user_id"].to_pylist()) == sorted(key_of(u) for u in users)
    assert set(ds.item_catalogue.names or ()) <= set(items)

    res = runner.invoke(main, ["train", "--data", str(data), "--out", str(ckpt), "--d-user", "1", *TINY])
    assert res.exit_code == 0, res.output
    assert read_key_scheme(ckpt) == BLAKE2B_63 and read_key_scheme(ckpt, "item_key") == BLAKE2B_63


def _prefill_and_verify(spark: object, runner: CliRunner, ckpt: Path, data: Path, store: Path) -> None:
    """The Spark prefill into ``store`` keeps the key schemes; `ckv store verify` passes."""
    manifest = run_prefill(PrefillOptions(checkpoint=str(ckpt), histories=str(data), store=str(store),
                                          spark_log_level=None, command_line="test"), spark)
    assert manifest["users"] == 40 and manifest["user_key"] == manifest["item_key"] == BLAKE2B_63
    assert read_key_scheme(store / "current") == BLAKE2B_63
    res = runner.invoke(main, ["store", "verify", str(store), "--checkpoint", str(ckpt), "--histories", str(data)])
    assert res.exit_code == 0, res.output


def _score(runner: CliRunner, store: Path, ckpt: Path, requests: Path, out: Path) -> Result:
    """`ckv score` of a requests CSV naming users and items by their text ids (columns visitor, sku)."""
    return runner.invoke(main, ["score", "--store", str(store), "--checkpoint", str(ckpt), "--requests", str(requests),
                                "--out", str(out), "--user-col", "visitor", "--item-col", "sku", "--device", "cpu"])


def _runtime_logits(store: Path, ckpt: Path, req: pd.DataFrame) -> np.ndarray:
    """The runtime's logits for the requests' keys and dense item ids themselves."""
    rt = DecodeRuntime.open(store, ckpt, device="cpu")
    try:
        keys = to_keys(req["visitor"].tolist(), BLAKE2B_63)
        dense = rt.catalogue.to_dense(to_keys(req["sku"].tolist(), BLAKE2B_63))
        return rt.score(keys, dense.reshape(-1, 1)).logits[:, 0]
    finally:
        rt.close()


def _serve_text_ids(store: Path, ckpt: Path, req: pd.DataFrame, direct: np.ndarray) -> None:
    """`ckv serve` takes the raw text user ids too (the version holds its checkpoint, as `ckv refresh` publishes)."""
    shutil.copytree(ckpt, (store / "current").resolve() / "checkpoint")
    with start_server(store) as srv, httpx.Client(base_url=srv.url) as client:
        body = {"user_ids": req["visitor"].tolist(), "candidates": [[int(d)] for d in to_keys(req["sku"].tolist(),
                                                                                              BLAKE2B_63)]}
        r = client.post("/score", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["cold_start"] == [False, False, False, True]
        np.testing.assert_allclose(r.json()["scores"], 1 / (1 + np.exp(-direct[:, None])), rtol=1e-5, atol=1e-6)


def test_text_ids_run_the_whole_chain(spark: object, tmp_path: Path) -> None:
    log, users, items = _log(tmp_path)
    runner = CliRunner()
    data, ckpt, store = tmp_path / "data", tmp_path / "ckpt", tmp_path / "store"
    _prepare_and_train(runner, log, users, items, data, ckpt)
    _prefill_and_verify(spark, runner, ckpt, data, store)

    # requests name users and items by their raw text ids; one user the store never saw
    stranger = "not-a-known-visitor"
    req = pd.DataFrame({"visitor": [users[0], users[0], users[7], stranger], "sku": [items[1], items[2], items[1],
                                                                                      items[3]], "note": list("abcd")})
    req_path, out = tmp_path / "requests.csv", tmp_path / "scores.parquet"
    req.to_csv(req_path, index=False)
    res = _score(runner, store, ckpt, req_path, out)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["user_key"] == summary["item_key"] == BLAKE2B_63 and summary["cold_start_users"] == 1
    scored = pq.read_table(out).to_pandas()
    assert scored["visitor"].tolist() == req["visitor"].tolist() and scored["note"].tolist() == list("abcd")
    assert scored["cold_start"].tolist() == [False, False, False, True]

    # the same scores as the runtime gives for the keys and dense ids themselves
    direct = _runtime_logits(store, ckpt, req)
    np.testing.assert_allclose(scored["logit"].to_numpy(), direct, rtol=1e-5, atol=1e-6)
    _serve_text_ids(store, ckpt, req, direct)

    # an item the catalogue lacks is named by its text id, with its row
    req.loc[2, "sku"] = "SKU-9999"
    req.to_csv(req_path, index=False)
    res = _score(runner, store, ckpt, req_path, out)
    assert res.exit_code == 1 and "row 3" in res.output and "'SKU-9999'" in res.output, res.output
