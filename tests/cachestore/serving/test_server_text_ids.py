"""`ckv serve` with raw text user ids (cachestore/serving/payloads.py ``key_users``): a real server on
127.0.0.1 and a real HTTP client. A store whose manifest says ``user_key: "blake2b-63"`` is asked with the
ids as the event log named them (an integer stands for its decimal text, as ``ckv data prepare`` keyed
it); a bad id is a 4xx naming its position, and the server keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collectivekv.cachestore.serving.payloads import ARROW_MIME
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, prefill_schema
from collectivekv.cachestore.store.publish import MANIFEST, build_version, new_staging_dir, publish
from collectivekv.cachestore.store.record import write_layout
from collectivekv.cachestore.store.user_keys import BLAKE2B_63, key_of
from tests.server_fixtures import FIRST_USER, ModelStore, start_server
from tests.store_fixtures import layout_for, prefill_rows

TOL = dict(rtol=1e-5, atol=1e-6)
N_USERS = 12
TEXT_IDS = [f"3f2a-visitor-{i:02d}" for i in range(N_USERS - 1)] + ["4242"]  # one raw id that looks numeric


def publish_text_keyed(model: ModelStore, root: Path) -> None:
    """Model's users stored under the blake2b-63 keys of TEXT_IDS (row i: TEXT_IDS[i]), the manifest saying so
    (as pipeline/store/store_ops.py records a prefill's ``user_key``), published with its checkpoint."""
    layout = layout_for(model.model, model.model_version, "collective", "float32")
    keys = [key_of(t) for t in TEXT_IDS]
    rows = prefill_rows(model.model, layout, keys, model.items, model.feedback, model.lengths)
    pdir = root / "parquet"
    pdir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=prefill_schema()), pdir / "part-00000.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    staging = new_staging_dir(root)
    manifest = build_version(pdir, staging, parquet="none")
    manifest.update(user_key=BLAKE2B_63, item_key="int")
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copytree(model.checkpoint, staging / "checkpoint")
    publish(root, staging)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path, Path]:
    """(model, a store keyed by text ids, the same model's store keyed by integers)."""
    work = tmp_path_factory.mktemp("server_text_ids")
    model = ModelStore.make(work, seed=5, n_users=N_USERS)
    publish_text_keyed(model, work / "text_store")
    model.publish(work / "int_store")
    return model, work / "text_store", work / "int_store"


def _expected(model: ModelStore, users: list, cands: list[list[int]]) -> tuple[list[list[float]], list[bool]]:
    """The model's probabilities and cold-start flags for raw ids (text, or an integer's decimal text)."""
    rows = [TEXT_IDS.index(str(u)) if str(u) in TEXT_IDS else None for u in users]
    ids = np.array([FIRST_USER + r if r is not None else 1 for r in rows])  # 1: a user no store holds
    width = max(map(len, cands))
    padded = np.array([c + [c[0]] * (width - len(c)) for c in cands])
    probs, cold = model.expected(ids, padded)
    return [probs[i, : len(c)].tolist() for i, c in enumerate(cands)], cold.tolist()


def _arrow(users: list[str], cands: list[list[int]]) -> bytes:
    table = pa.table({"user_id": pa.array(users, pa.string()), "candidates": pa.array(cands, pa.list_(pa.int64()))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_text_user_ids_score_as_the_stored_users(stores: tuple[ModelStore, Path, Path]) -> None:
    """JSON and Arrow requests name users by their raw text ids (and 4242 by its integer); a text id the store
    lacks is a cold start; the scores are the model's for those users' histories."""
    model, text_store, _ = stores
    users = [TEXT_IDS[0], TEXT_IDS[5], 4242, "a-visitor-never-seen", TEXT_IDS[2]]
    cands = [[3, 9], [1], [4, 2, 7], [5], [6, 8]]
    want, cold = _expected(model, users, cands)
    assert cold == [False, False, False, True, False]
    with start_server(text_store) as srv, httpx.Client(base_url=srv.url) as client:
        r = client.post("/score", json={"user_ids": users, "candidates": cands})
        assert r.status_code == 200, r.text
        assert r.json()["cold_start"] == cold and r.json()["model_version"] == model.model_version
        for got, exp in zip(r.json()["scores"], want, strict=True):
            np.testing.assert_allclose(got, exp, **TOL)
        r = client.post("/score", json={"user_ids": [4242], "candidates": [[4, 2, 7]]})  # integers only: keyed too
        assert r.status_code == 200 and r.json()["cold_start"] == [False], r.text
        np.testing.assert_allclose(r.json()["scores"][0], want[2], **TOL)

        text_users = [str(u) for u in users]
        r = client.post("/score", content=_arrow(text_users, cands), headers={"content-type": ARROW_MIME})
        assert r.status_code == 200, r.text
        reply = pa.ipc.open_stream(r.content).read_all()
        assert reply.column("user_id").to_pylist() == text_users  # echoed as sent
        assert reply.column("cold_start").to_pylist() == cold
        for got, exp in zip(reply.column("scores").to_pylist(), want, strict=True):
            np.testing.assert_allclose(got, exp, **TOL)


BAD_TEXT_STORE = [  # (user_ids, field): each a 422 naming the id
    ([""], "user_ids[0]"),
    (["a" * 257], "user_ids[0]"),
    (["u-1", 1.5], "user_ids[1]"),
    (["u-1", None], "user_ids[1]"),
    (["u-1", True], "user_ids[1]"),
    (["u-1", -3], "user_ids[1]"),
    (["u-1", ["nested"]], "user_ids[1]"),
    ([-1], "user_ids[0]"),
]


def test_bad_user_ids_get_a_4xx_and_the_server_keeps_serving(stores: tuple[ModelStore, Path, Path]) -> None:
    """Ids neither text nor an integer 0..2^63-1 are refused by the text-keyed store; a store keyed by
    integers refuses text ids, saying so; both answer the next good request."""
    model, text_store, int_store = stores
    with start_server(text_store) as srv, httpx.Client(base_url=srv.url) as client:
        for users, field in BAD_TEXT_STORE:
            r = client.post("/score", json={"user_ids": users, "candidates": [[1]] * len(users)})
            assert r.status_code == 422, (users, r.text)
            assert r.json()["field"] == field and r.json()["error"], (users, r.text)
        r = client.post("/score", json={"user_ids": [TEXT_IDS[1]], "candidates": [[2]]})
        assert r.status_code == 200 and r.json()["cold_start"] == [False], r.text
        assert client.get("/healthz").status_code == 200
        # a JSON escape of a lone surrogate: text UTF-8 cannot encode — a 422, and the scoring worker lives on
        r = client.post("/score", content=b'{"user_ids": ["\\ud800"], "candidates": [[1]]}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == "user_ids[0]", r.text
        r = client.post("/score", json={"user_ids": [TEXT_IDS[1]], "candidates": [[2]]})
        assert r.status_code == 200, r.text

    with start_server(int_store) as srv, httpx.Client(base_url=srv.url) as client:
        r = client.post("/score", json={"user_ids": [FIRST_USER, TEXT_IDS[0]], "candidates": [[1], [2]]})
        assert r.status_code == 422 and r.json()["field"] == "user_ids[1]", r.text
        assert "keys users by integer ids" in r.json()["error"] and TEXT_IDS[0] in r.json()["error"]
        r = client.post("/score", content=_arrow([TEXT_IDS[0]], [[1]]), headers={"content-type": ARROW_MIME})
        assert r.status_code == 422 and r.json()["field"] == "user_id[0]", r.text
        r = client.post("/score", json={"user_ids": [FIRST_USER], "candidates": [[2]]})
        assert r.status_code == 200 and r.json()["cold_start"] == [False], r.text
        want, _ = _expected(model, [TEXT_IDS[0]], [[2]])  # row 0 is user FIRST_USER in both stores
        np.testing.assert_allclose(r.json()["scores"][0], want[0], **TOL)
