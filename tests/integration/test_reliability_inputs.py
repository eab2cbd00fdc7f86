"""Bad input catalogue (the cases not already covered elsewhere; see docs/reliability.md for the whole
table and where each other case is tested): each gives a clear error naming what and where, says what
to do, and touches nothing published."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.publish import current_version_id, open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import (
    HEADER_SIZE,
    ChecksumError,
    LayoutError,
    RecordError,
    RecordSizeError,
    UnsupportedVersionError,
)
from collectivekv.pipeline.prefill.prefill import INPUT_HINT, PrefillInputError, cache_layout, prefill_batches
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.pipeline.prefill.prefill_helpers import MV, N_ITEMS, histories, make_model, small_config
from tests.store_fixtures import put_in_place


def _lists(values: list, typ: pa.DataType | None = None) -> pa.Array:
    return pa.array(values, pa.list_(typ or pa.int32()))


BATCH = histories([3, 2])  # users 100, 101; columns user_id, items, timestamps, labels
BAD_BATCHES = {
    "null element in items": (BATCH.set_column(1, "items", _lists([[1, None, 3], [4, 5]])),
                              r"user 100: null element in 'items' \(position 1\)"),
    "null element in labels": (BATCH.set_column(3, "labels", _lists([[1, 0, 1], [None, 1]], pa.int8())),
                               r"user 101: null element in 'labels' \(position 0\)"),
    "null user id": (BATCH.set_column(0, "user_id", pa.array([100, None], pa.int64())),
                     "row 1 of the batch: null 'user_id'"),
    "negative user id": (BATCH.set_column(0, "user_id", pa.array([100, -7], pa.int64())),
                         r"user -7: user ids must be in 0..2\*\*63-1"),
    "user id beyond int64": (BATCH.set_column(0, "user_id", pa.array([2**63 + 1, 5], pa.uint64())),
                             "user 9223372036854775809: user ids must be"),
    "negative item id": (BATCH.set_column(1, "items", _lists([[1, -2, 3], [4, 5]])),
                         f"user 100: item -2 / label .* outside the model's items 1..{N_ITEMS}"),
    "item id 0 (padding)": (BATCH.set_column(1, "items", _lists([[1, 2, 3], [0, 5]])),
                            "user 101: item 0 /"),
    "label 2": (BATCH.set_column(3, "labels", _lists([[1, 2, 0], [0, 1]], pa.int8())),
                "user 100: item .* / label 2 outside"),
    "items and labels of different lengths": (BATCH.set_column(3, "labels", _lists([[1, 0, 1], [0]], pa.int8())),
                                              "user 101: 2 items but 1 labels"),
    "float user ids": (BATCH.set_column(0, "user_id", pa.array([1.0, 2.0])), "'user_id' has type double"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_history_batches(case: str) -> None:
    model = make_model(small_config())
    batch, match = BAD_BATCHES[case]
    with pytest.raises(PrefillInputError, match=match) as info:
        list(prefill_batches([batch], model, cache_layout(model.cfg, MV)))
    assert INPUT_HINT in str(info.value)  # what to do, and that nothing was published


def test_extra_columns_empty_histories_empty_input_and_truncation_count() -> None:
    model = make_model(small_config())  # max_len 8
    layout = cache_layout(model.cfg, MV)
    batch = histories([0, 8, 9, 30, 1]).append_column("unrelated", pa.array(["a", "b", "c", "d", "e"]))
    counts: dict[str, int] = {}
    out = pa.Table.from_batches(list(prefill_batches([batch], model, layout, batch_users=2, counts=counts)))
    assert out.column("length").to_pylist() == [0, 8, 8, 8, 1]  # empty history: a 0-length record
    assert counts == {"users": 5, "truncated": 2}  # 9 and 30 events: the latest 8 kept, counted
    assert list(prefill_batches([], model, layout)) == []
    assert list(prefill_batches([batch.slice(0, 0)], model, layout)) == []


# ----------------------------------------------------------------------------- stores on disk
@pytest.fixture()
def store(tmp_path: Path) -> dict:
    """A store of the prefill tests' model (max_len 8) built by the per-partition prefill, 30 users."""
    from collectivekv.pipeline.store.store_ops import build_store
    from tests.pipeline.prefill.prefill_helpers import write_prefill

    model = make_model(small_config())
    layout = cache_layout(model.cfg, MV)
    lengths = [int(n) for n in np.random.default_rng(3).integers(4, 12, 30)]
    build_store(tmp_path / "store", write_prefill(tmp_path, model, layout, [histories(lengths, first_user=0)]),
                command_line="t")
    return {"root": tmp_path / "store", "users": list(range(30)), "uid": 7, "model": model,
            "version": open_current(tmp_path / "store")}


def test_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no published store version under .*: not a store root"):
        StoreReader.open_current(tmp_path / "junk")
    with pytest.raises(LayoutError, match="cannot read layout"):
        StoreReader(tmp_path / "junk")
    from collectivekv.jobs.score import score as score_cmd
    from collectivekv.jobs.store import store as store_cli

    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, make_model(small_config()), {})
    req = tmp_path / "req.csv"
    req.write_text("user_id,item_id\n1,2\n")
    r = CliRunner().invoke(score_cmd, ["--store", str(tmp_path / "junk"), "--checkpoint", str(ckpt),
                                       "--requests", str(req), "--out", str(tmp_path / "o.parquet")])
    assert r.exit_code == 1 and "cannot read layout" in r.output
    r = CliRunner().invoke(store_cli, ["verify", str(tmp_path / "junk"), "--checkpoint", str(ckpt),
                                       "--histories", str(tmp_path)])
    assert r.exit_code == 1 and "not a store root" in r.output


def _flip_on_disk(version: Path, raw: bytes, offset: int) -> None:
    """Flip one bit of a record's bytes inside data.mdb itself (bit rot), not through LMDB."""
    path = version / "lmdb" / "data.mdb"
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    data[at + offset] ^= 0x04
    path.write_bytes(bytes(data))


def test_bit_flipped_record_on_disk_is_detected(store: dict, tmp_path: Path) -> None:
    reader = StoreReader(store["version"])
    uid = store["uid"]
    raw = reader.get_raw(uid)
    reader.close()
    _flip_on_disk(store["version"], raw, HEADER_SIZE + 1)  # a payload byte
    reader = StoreReader(store["version"])
    with pytest.raises(ChecksumError, match=f"user {uid}: CRC mismatch"):
        reader.get(uid)
    with pytest.raises(ChecksumError):
        list(reader.iter_records())
    assert reader.get(uid + 1) is not None  # the others still read
    reader.close()


def _put(version: Path, uid: int, value: bytes) -> None:
    """Overwrite one record in place (simulated corruption of an immutable version; tests only)."""
    put_in_place(version, {uid: value})


@pytest.mark.parametrize(("mutate", "exc", "match"), [
    (lambda raw: raw[:-3], RecordSizeError, "truncated record"),
    (lambda raw: raw[:20], RecordSizeError, "truncated record: 20 bytes < 32-byte header"),
    (lambda raw: raw[:4] + (3).to_bytes(2, "little") + raw[6:], UnsupportedVersionError,
     "record format version 3, the store's layout needs 2"),
])
def test_truncated_or_future_format_record_in_a_store(store: dict, mutate, exc: type, match: str) -> None:
    """Refused by the verified reader and by the serving runtime's fast path (headers + sizes)."""
    uid = store["uid"]
    with StoreReader(store["version"]) as reader:
        raw = reader.get_raw(uid)
    _put(store["version"], uid, mutate(raw))
    reader = StoreReader(store["version"])
    with pytest.raises(exc, match=f"user {uid}: {match}"):
        reader.get(uid)
    rt = DecodeRuntime(store["model"], MV, reader, device="cpu")
    assert np.isfinite(rt.score([uid + 1], [[1]]).logits).all()
    with pytest.raises(RecordError, match=f"user {uid}"):
        rt.score([uid + 1, uid], [[1], [2]])
    assert current_version_id(store["root"]) == store["version"].name
    reader.close()


def test_verify_reports_a_corrupt_store(tmp_path: Path) -> None:
    """`ckv store verify` on a store with a bit-flipped record: exit 1 naming the user."""
    from collectivekv.jobs.store import store as store_cli
    from collectivekv.pipeline.store.store_ops import build_store
    from tests.pipeline.prefill.prefill_helpers import write_prefill

    model = make_model(small_config())
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    layout = cache_layout(model.cfg, version)
    hist = histories([5, 3, 9], first_user=0)
    (tmp_path / "hist").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_batches([hist]), tmp_path / "hist" / "h.parquet")
    build_store(tmp_path / "store", write_prefill(tmp_path, model, layout, [hist]), command_line="t")
    vdir = open_current(tmp_path / "store")
    with StoreReader(vdir) as reader:
        raw = reader.get_raw(2)
    _flip_on_disk(vdir, raw, len(raw) - 1)
    r = CliRunner().invoke(store_cli, ["verify", str(tmp_path / "store"), "--checkpoint", str(tmp_path / "ckpt"),
                                       "--histories", str(tmp_path / "hist")])
    assert r.exit_code == 1 and "user 2: CRC mismatch" in r.output


@pytest.mark.parametrize("path", ["gather", "poolscore"])
def test_router_index_outside_the_pool_in_a_store(store: dict, path: str) -> None:
    """An index >= pool size in a served record: the runtime raises RouterIndexError naming the user (never a
    raw IndexError) (after the batch, from the per-user flag), and the reader too."""
    from collectivekv.cachestore.store.entry import decode_entry, encode_entry
    from collectivekv.cachestore.store.record import RouterIndexError

    uid = store["uid"]
    with StoreReader(store["version"]) as reader:
        layout = reader.layout
        rec = decode_entry(layout, reader.get_raw(uid))
    parts = {name: a.copy() for name, a in rec.arrays.items()}
    parts["kv.k_idx"][-1] = layout.pool_size
    _put(store["version"], uid, encode_entry(layout, rec.length, [parts[p.name] for p in layout.parts]))
    reader = StoreReader(store["version"])
    rt = DecodeRuntime(store["model"], MV, reader, device="cpu", path=path)
    assert np.isfinite(rt.score([uid + 1], [[1]]).logits).all()
    with pytest.raises(RouterIndexError, match=f"user {uid}: a router index outside the pool"):
        rt.score([uid + 1, uid], [[1], [2]])
    with pytest.raises(RouterIndexError, match=f"user {uid}: kv.k_idx router index {layout.pool_size} at behaviour"):
        reader.get(uid)
    reader.close()


def test_verify_counts_users_not_history_rows(tmp_path: Path) -> None:
    """A history row repeated in place of another user's: the row count equals the store's users, yet one stored
    user goes unchecked — `ckv store verify` names the repeated user and exits 1."""
    import shutil

    import pyarrow.parquet as pq

    from collectivekv.jobs.store import store as store_cli

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "v1_din_store"
    table = pq.read_table(fixture / "histories.parquet")
    repeated = pa.concat_tables([table.slice(0, table.num_rows - 1), table.slice(0, 1)])
    pq.write_table(repeated, tmp_path / "histories.parquet")
    shutil.copytree(fixture / "store", tmp_path / "store", symlinks=True)
    r = CliRunner().invoke(store_cli, ["verify", str(tmp_path / "store"), "--checkpoint", str(fixture / "checkpoint"),
                                       "--histories", str(tmp_path / "histories.parquet")])
    first = table.column("user_id")[0].as_py()
    assert r.exit_code == 1 and f"user {first} has 2 rows" in r.output
    assert f"store holds {table.num_rows} users, histories {table.num_rows - 1}" in r.output


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_timestamp_at_or_above_2_63_is_refused_not_wrapped_into_the_past(tmp_path: Path, fmt: str) -> None:
    """A uint64 / 20-digit timestamp would wrap negative: the far-future event would become the user's first and
    sit in every history of that user. Refused, naming the column, row and value."""
    import pyarrow.parquet as pq

    from collectivekv.jobs.cli import main

    stamp = 2**64 - 5
    if fmt == "csv":
        (tmp_path / "e.csv").write_text(f"userId,movieId,rating,timestamp\n1,10,5,100\n1,11,3,200\n1,12,5,{stamp}\n")
    else:
        pq.write_table(pa.table({"userId": pa.array([1, 1, 1], pa.int64()), "movieId": pa.array([10, 11, 12]),
                                 "rating": [5.0, 3.0, 5.0], "timestamp": pa.array([100, 200, stamp], pa.uint64())}),
                       tmp_path / "e.parquet")
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(tmp_path / f"e.{fmt}"), "--out",
                                    str(tmp_path / "out")])
    assert res.exit_code == 1 and "column 'timestamp'" in res.output and "at or above 2**63" in res.output
    assert str(stamp) in res.output and not (tmp_path / "out").exists()


def test_a_boolean_timestamp_is_refused_not_read_as_one(tmp_path: Path) -> None:
    """A Parquet boolean time column (True would be 1 s after the epoch) is refused, naming the column and row."""
    import pyarrow.parquet as pq

    from collectivekv.jobs.cli import main

    pq.write_table(pa.table({"userId": [1, 1], "movieId": [10, 11], "rating": [5.0, 3.0],
                             "timestamp": pa.array([True, False])}), tmp_path / "e.parquet")
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(tmp_path / "e.parquet"), "--out",
                                    str(tmp_path / "out")])
    assert res.exit_code == 1 and "column 'timestamp'" in res.output and "2 boolean value(s)" in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["sim", "hstu"])
@pytest.mark.parametrize("tier_bytes", [0, 1 << 30])
def test_a_zoo_records_router_index_outside_the_pool_names_the_user(tmp_path: Path, arch: str, tier_bytes: int) -> None:
    """A zoo store's record with an index >= pool size and a valid CRC (checked CRCs do not catch it): the eager
    decode reads it as 0 and flags the user — RouterIndexError naming them, tier on or off, never an IndexError."""
    import zlib

    from collectivekv.cachestore.decode.runtime import DecodeRuntime
    from collectivekv.cachestore.store.record import HEADER_SIZE, RouterIndexError
    from tests.cachestore.decode.zoo_serving_helpers import USERS, VERSION
    from tests.cachestore.decode.zoo_serving_helpers import histories as zoo_histories
    from tests.model.zoo_helpers import make_model as make_zoo_model
    from tests.model.zoo_helpers import zoo_config
    from tests.store_fixtures import put_in_place
    from tests.zoo_store_fixtures import zoo_store_of_model

    model = make_zoo_model(zoo_config(arch), seed=1).eval()
    zoo_store_of_model(tmp_path, model, VERSION, USERS, *zoo_histories(model.cfg, seed=10), "collective", "float32")
    with StoreReader(open_current(tmp_path)) as reader:
        layout, victim = reader.layout, max(USERS, key=lambda u: len(reader.get_raw(u)))
        record = bytearray(reader.get_raw(victim))
    at = HEADER_SIZE  # the first row of the first index part: the pool size itself
    for part, width in zip(layout.parts, layout.row_bytes, strict=True):
        if part.kind == "idx":
            dt = np.dtype(layout.dtype("idx")).newbyteorder("<")
            record[at : at + dt.itemsize] = np.array([layout.pool_size], dt).tobytes()
            break
        at += min(int.from_bytes(record[12:16], "little"), part.cap) * width
    record[28:32] = zlib.crc32(bytes(record[:28]), zlib.crc32(bytes(record[HEADER_SIZE:]))).to_bytes(4, "little")
    put_in_place(open_current(tmp_path), {victim: bytes(record)})
    reader = StoreReader(open_current(tmp_path))
    rt = DecodeRuntime(model, VERSION, reader, device="cpu", batch_users=4, tier_bytes=tier_bytes)
    with pytest.raises(RouterIndexError, match=f"user {victim}: a router index outside the pool"):
        rt.score([USERS[0], victim], [[1], [2]])
    others = [u for u in USERS if u != victim][:2]  # the other users still score
    assert np.isfinite(rt.score(others, [[1]] * len(others)).logits).all()
    rt.close()
