"""Zoo store records as the serving path reads them: StoreReader decodes them (get, get_many, raw bytes,
iteration); a store of another model version, arch or layout, or a checkpoint it does not fit, is refused when the
runtime is created; a bad record (another model version or layout, a CRC mismatch) is refused naming the user."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.entry import EntryLayout, EntryRecord, decode_entry, encode_entry, entry_layout
from collectivekv.cachestore.store.publish import open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import ChecksumError, LayoutError, ModelVersionMismatchError, RecordError
from collectivekv.model.config import CollectiveConfig
from collectivekv.model.zoo import PAPER_MODELS
from tests.cachestore.decode.zoo_serving_helpers import OTHER, USERS, VERSION
from tests.model.zoo_helpers import make_batch, make_model, zoo_config
from tests.zoo_store_fixtures import publish_records


def test_reader_decodes_zoo_records(zoo_served: dict) -> None:
    s = zoo_served["sdim"]
    root = s["stores"]["collective", "float16"]
    reader = StoreReader(open_current(root))
    layout = reader.layout
    assert isinstance(layout, EntryLayout) and len(reader) == len(USERS)
    rec = reader.get(USERS[2])
    assert isinstance(rec, EntryRecord) and rec.length == s["model"].cfg.window_len
    assert set(rec.arrays) == {p.name for p in layout.parts}
    assert reader.get(5) is None
    many = reader.get_many([USERS[3], 5, USERS[2]])
    assert many[1] is None and many[2].length == rec.length
    for name, a in rec.arrays.items():
        np.testing.assert_array_equal(many[2].arrays[name], a)
    assert decode_entry(layout, reader.get_raw(USERS[2])).model_version == VERSION
    seen = dict(reader.iter_records())
    assert sorted(seen) == USERS and all(isinstance(r, EntryRecord) for r in seen.values())


def test_store_and_checkpoint_mismatches_are_refused(zoo_served: dict, tmp_path: Path) -> None:
    for i, arch in enumerate(PAPER_MODELS):
        s = zoo_served[arch]
        reader = StoreReader(open_current(s["stores"]["collective", "float16"]))
        with pytest.raises(ModelVersionMismatchError, match=f"model version {VERSION}, but .* model version {OTHER}"):
            DecodeRuntime(s["model"], OTHER, reader, device="cpu")
        other = PAPER_MODELS[(i + 1) % len(PAPER_MODELS)]
        with pytest.raises(LayoutError, match=f"holds '{arch}' caches.* checkpoint is arch '{other}'"):
            DecodeRuntime(zoo_served[other]["model"], VERSION, reader, device="cpu")
        bigger = make_model(zoo_config(arch, collective=CollectiveConfig(d_user=3, pool_size=12)))
        with pytest.raises(LayoutError, match=f"parts do not fit the {arch} model.*k_user"):
            DecodeRuntime(bigger, VERSION, reader, device="cpu")
        full_model = make_model(zoo_config(arch, kv_mode="full"))
        with pytest.raises(LayoutError, match="full-KV model"):
            DecodeRuntime(full_model, VERSION, reader, device="cpu")
        with pytest.raises(ValueError, match="poolscore"):
            DecodeRuntime(s["model"], VERSION, reader, device="cpu", path="poolscore")
    # a din checkpoint on a zoo store, a zoo checkpoint on a din store
    from tests.model.test_model import make_model as make_din
    from tests.model.test_model import small_config
    from tests.store_fixtures import store_of_model

    din = make_din(small_config()).eval()
    with pytest.raises(LayoutError, match="holds 'sim' caches.* checkpoint is arch 'din'"):
        DecodeRuntime(din, VERSION, StoreReader(open_current(zoo_served["sim"]["stores"]["collective", "float16"])))
    items, feedback, lengths, _ = make_batch([2, 3], 8, 0)
    din_store = store_of_model(tmp_path / "din", din, VERSION, [1, 2], items, feedback, lengths)
    with pytest.raises(LayoutError, match="holds 'din' caches, but the checkpoint is arch 'hstu'"):
        DecodeRuntime(zoo_served["hstu"]["model"], VERSION, StoreReader(open_current(din_store)), device="cpu")


def test_bad_records_in_a_zoo_store(tmp_path: Path) -> None:
    """A record of another model version, of another layout, or corrupt: refused naming the user."""
    cfg = zoo_config("eta")
    model = make_model(cfg).eval()
    layout = entry_layout(cfg, VERSION, "collective", "float16")
    rng = np.random.default_rng(0)

    def record(lay: EntryLayout, n: int) -> bytes:
        parts = [rng.integers(0, 5, (min(n, p.cap), p.width)).astype(lay.dtype(p.kind)) for p in lay.parts]
        return encode_entry(lay, n, parts)

    corrupt = bytearray(record(layout, 4))
    corrupt[-1] ^= 1
    wider = entry_layout(dataclasses.replace(cfg, hash_bits=12), VERSION, "collective", "float16")
    records = {1: record(layout, 3), 2: record(dataclasses.replace(layout, model_version=OTHER), 3),
               3: record(wider, 3), 4: bytes(corrupt), 5: record(layout, 0)}  # fmt: skip
    root = publish_records(tmp_path, layout, records)
    reader = StoreReader(open_current(root))
    rt = DecodeRuntime(model, VERSION, reader, device="cpu")
    assert np.isfinite(rt.score([1, 4, 5, 6], [[1], [2], [3], [4]]).logits).all()  # CRCs not checked by default
    with pytest.raises(ModelVersionMismatchError, match=f"user 2: model version {OTHER} != expected"):
        rt.score([1, 2], [[1], [2]])
    with pytest.raises(RecordError, match="user 3: header .* does not match the store layout"):
        rt.score([3], [[1]])
    checked = DecodeRuntime(model, VERSION, reader, device="cpu", verify_crc=True)
    assert np.isfinite(checked.score([1, 5], [[1], [2]]).logits).all()
    with pytest.raises(ChecksumError, match="user 4: CRC mismatch"):
        checked.score([1, 4], [[1], [2]])
    with pytest.raises(ChecksumError, match="user 4"):
        reader.get(4)
