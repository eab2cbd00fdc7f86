"""The read-only reader of format-1 din stores (cachestore/store/legacy_v1.py) on a real one.

``tests/fixtures/v1_din_store`` was written by the format-1 writers (``tests/store_fixtures.py`` of commit
224feb4): a din model (d_a 32, d_u 2, pool 12, max_len 8) saved as ``checkpoint/``, the 24 users of
``histories.parquet`` prefilled into ``store/`` at fp16, and three candidates per user in ``candidates.npy``.
Every test works on a copy of it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.checkpoint import load_checkpoint
from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.entry import decode_entry, encode_entry, entry_layout, layout_from_dict, read_layout
from collectivekv.cachestore.store.legacy_v1 import legacy_fields
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, StoreBuildError, build_lmdb
from collectivekv.cachestore.store.publish import LAYOUT, LMDB_DIR, MANIFEST, open_current
from collectivekv.cachestore.store.record import LayoutError, RecordError
from collectivekv.jobs.store import store as store_cli
from collectivekv.pipeline.data.history import arrow_window
from tests.store_fixtures import put_in_place

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "v1_din_store"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A writable copy of the fixture (store, checkpoint, histories, candidates)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "v1", symlinks=True))


def _records(version: Path) -> dict[int, bytes]:
    env = lmdb.open(str(version / LMDB_DIR), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        out = {int.from_bytes(k, "big"): bytes(v) for k, v in txn.cursor()}
    env.close()
    return out


def _model_logits(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, candidates, the model's own logits model.decode(model.prefill(window), candidates))."""
    table = pq.read_table(root / "histories.parquet")
    model = load_checkpoint(root / "checkpoint").model
    w = arrow_window(table.column("items").combine_chunks(), table.column("labels").combine_chunks(),
                     model.cfg.max_len)  # fmt: skip
    cand = np.load(root / "candidates.npy", allow_pickle=False)
    with torch.no_grad():
        cache = model.prefill(torch.from_numpy(w.items), torch.from_numpy(w.feedback), torch.from_numpy(w.lengths))
        logits = model.decode(cache, torch.from_numpy(cand)).numpy()
    return table.column("user_id").to_numpy(), cand, logits


def test_layout_reads_as_the_din_entry_of_record_format_1(legacy: Path) -> None:
    version = open_current(legacy / "store")
    layout = read_layout(version / LAYOUT)
    raw = json.loads((version / LAYOUT).read_text())
    assert "layout_version" not in raw or raw["layout_version"] != 2
    assert (layout.arch, layout.mode, layout.record_format, layout.max_len, layout.pool_size) == (
        "din", "collective", 1, 8, 12)
    assert [p.name for p in layout.parts] == ["kv.k_user", "kv.v_user", "kv.k_idx", "kv.v_idx"]
    ckpt = load_checkpoint(legacy / "checkpoint")
    assert dataclasses.replace(layout, record_format=2) == entry_layout(ckpt.model.cfg, ckpt.model_version,
                                                                        "collective", "float16")
    pre, post = layout.header_parts
    records = _records(version)
    assert len(records) == 24
    for uid, rec in records.items():  # the header bytes every record shares, as the batcher checks them
        assert rec[:12] == pre and rec[16:28] == post, uid
        assert len(rec) == layout.record_size(int.from_bytes(rec[12:16], "little"))


def test_format_1_payload_is_the_din_entry_payload(legacy: Path) -> None:
    version = open_current(legacy / "store")
    layout = read_layout(version / LAYOUT)
    current = dataclasses.replace(layout, record_format=2)
    for uid, rec in _records(version).items():
        got = decode_entry(layout, rec, expected_model_version=layout.model_version, user_id=uid)
        again = encode_entry(current, got.length, [got.arrays[p.name] for p in current.parts])
        assert again[32:] == rec[32:] and len(again) == len(rec)
        assert again[:4] == rec[:4] and again[4:6] != rec[4:6]  # same frame, format 2 header


def test_store_verify_passes(legacy: Path) -> None:
    res = CliRunner().invoke(store_cli, ["verify", str(legacy / "store"), "--checkpoint", str(legacy / "checkpoint"),
                                         "--histories", str(legacy / "histories.parquet")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "checked 24 users" in res.output and res.output.strip().endswith("OK")


@pytest.mark.parametrize("path", ["gather", "poolscore"])
@pytest.mark.parametrize("verify_crc", [False, True])
def test_runtime_scores_equal_the_model_forward(legacy: Path, path: str, verify_crc: bool) -> None:
    users, cand, want = _model_logits(legacy)
    with DecodeRuntime.open(legacy / "store", legacy / "checkpoint", device="cpu", path=path,
                            verify_crc=verify_crc, batch_users=7) as rt:  # fmt: skip
        got = rt.score(users, cand)
    assert not got.cold_start.any()
    np.testing.assert_allclose(got.logits, want, rtol=2e-3, atol=2e-3)  # fp16 user parts


def test_damaged_record_fails_cleanly(legacy: Path) -> None:
    version = open_current(legacy / "store")
    records = _records(version)
    uid = max(records, key=lambda u: len(records[u]))
    payload_flip, header_flip = bytearray(records[uid]), bytearray(records[uid])
    payload_flip[-3] ^= 0x40
    header_flip[16] ^= 0x01  # dk
    put_in_place(version, {uid: bytes(payload_flip)})
    res = CliRunner().invoke(store_cli, ["verify", str(legacy / "store"), "--checkpoint", str(legacy / "checkpoint"),
                                         "--histories", str(legacy / "histories.parquet")])  # fmt: skip
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and f"user {uid}: CRC mismatch" in lines[0], res.output
    with (DecodeRuntime.open(legacy / "store", legacy / "checkpoint", device="cpu", verify_crc=True) as rt,
          pytest.raises(RecordError, match=f"user {uid}: CRC mismatch") as info):
        rt.score([uid], [[1]])
    assert "\n" not in str(info.value)
    put_in_place(version, {uid: bytes(header_flip)})
    with (DecodeRuntime.open(legacy / "store", legacy / "checkpoint", device="cpu") as rt,
          pytest.raises(RecordError, match=f"user {uid}") as info):
        rt.score([uid], [[1]])
    assert "\n" not in str(info.value)


def test_nothing_writes_format_1(legacy: Path, tmp_path: Path) -> None:
    version = open_current(legacy / "store")
    layout = read_layout(version / LAYOUT)
    parts = [np.zeros((1, p.width), layout.dtype(p.kind)) for p in layout.parts]
    with pytest.raises(LayoutError, match="read-only"):
        encode_entry(layout, 1, parts)
    pdir = tmp_path / "parquet"
    shutil.copytree(version / "parquet", pdir)
    assert json.loads((pdir / PARQUET_LAYOUT_FILE).read_text()) == json.loads((version / LAYOUT).read_text())
    with pytest.raises(StoreBuildError, match="read-only"):
        build_lmdb(pdir, tmp_path / "lmdb")


def test_bad_format_1_layouts_are_refused() -> None:
    good = json.loads(next((FIXTURE / "store" / "versions").glob("*/layout.json")).read_text())
    manifest = json.loads(next((FIXTURE / "store" / "versions").glob(f"*/{MANIFEST}")).read_text())
    assert layout_from_dict(manifest["layout"]) == layout_from_dict(good) and legacy_fields(good)["record_format"] == 1
    for bad, msg in (({**good, "dk": 0}, "dk and dv"), ({**good, "extra": 1}, "unknown"),
                     ({k: v for k, v in good.items() if k != "dv"}, "missing"),
                     ({**good, "kv_dtype": "int8"}, "kv_dtype"),
                     ({**good, "k_shared": 1}, "wrong type"), ({**good, "layout_version": 4}, "layout_version"),
                     ({**good, "idx_dtype": None}, "idx_dtype"), ({**good, "model_version": "xyz"}, "model_version")):
        with pytest.raises(LayoutError, match=msg):
            layout_from_dict(bad)


@pytest.mark.parametrize("how", ["fused", "tier", "graph"])
def test_in_place_readers_serve_it(legacy: Path, how: str) -> None:
    """The paths that read din records in place (fused kernel, resident tier, the graphs' static decode,
    eager on CPU) serve the format-1 records like the eager gather path."""
    from collectivekv.cachestore.decode.fused import FusedConfig, fused_available

    users, cand, want = _model_logits(legacy)
    if how == "fused" and not fused_available(torch.device("cpu")):
        pytest.skip("needs Triton (its CPU interpreter here)")
    options = {"fused": dict(path="fused", fused_config=FusedConfig(pool_dtype="float32")),
               "tier": dict(tier_bytes=1 << 20), "graph": dict(path="gather")}[how]
    with DecodeRuntime.open(legacy / "store", legacy / "checkpoint", device="cpu", batch_users=8, **options) as rt:
        if how == "graph":
            rt.graphs = True  # eager static decode on CPU (what tests/cachestore/decode/test_graphs.py does)
        got = rt.score(users, cand)
        assert (rt.tier is not None) == (how == "tier")
    np.testing.assert_allclose(got.logits, want, rtol=2e-3, atol=2e-3)


def test_capacity_of_a_store_without_d_attn_asks_for_it(legacy: Path) -> None:
    """The full-KV column's width is never guessed: an older store's plan needs --d-attn."""
    from collectivekv.pipeline.reports.capacity_inputs import store_format

    with pytest.raises(ValueError, match="give --d-attn"):
        store_format(legacy / "store")
    assert store_format(legacy / "store", d_attn=32).d_attn == 32
