"""Request parsing of the serving process (cachestore/serving/payloads.py): any body is either a valid
request or a BadRequest naming a field — never another exception (hypothesis)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.serving.payloads import (
    BadRequest,
    Limits,
    key_users,
    parse_arrow,
    parse_json,
    to_dense_items,
)
from collectivekv.cachestore.store.item_ids import ItemIds
from collectivekv.cachestore.store.user_keys import BLAKE2B_63, INT, key_of

LIMITS = Limits(max_users=16, max_candidates=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(["user_ids", "candidates", "x"]),
                                                                 inner, max_size=3),
    max_leaves=30)


def _valid(req) -> None:  # noqa: ANN001
    assert req.user_ids.dtype == np.int64 and (req.user_ids >= 0).all() and 1 <= req.n_users <= LIMITS.max_users
    real = np.arange(req.candidates.shape[1])[None, :] < req.n_candidates[:, None]
    assert (req.candidates[real] >= 0).all() and (req.candidates[~real] == 0).all()  # raw ids: 0 is an id
    assert (req.n_candidates >= 1).all() and (req.n_candidates <= LIMITS.max_candidates).all()


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON_VALUES, st.fixed_dictionaries({"user_ids": JSON_VALUES, "candidates": JSON_VALUES})))
def test_any_json_is_a_request_or_a_bad_request(doc: object) -> None:
    try:
        _valid(parse_json(json.dumps(doc).encode(), LIMITS))
    except BadRequest as exc:
        assert exc.status in (400, 413, 422) and exc.field and exc.message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**63 - 1), st.lists(st.integers(1, 2**63 - 1), min_size=1, max_size=8)),
                min_size=1, max_size=16))
def test_valid_requests_round_trip_in_json_and_arrow(rows: list) -> None:
    users = [u for u, _ in rows]
    cands = [c for _, c in rows]
    from_json = parse_json(json.dumps({"user_ids": users, "candidates": cands}).encode(), LIMITS)
    table = pa.table({"user_id": pa.array(users, pa.int64()), "candidates": pa.array(cands, pa.list_(pa.int64()))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    from_arrow = parse_arrow(sink.getvalue().to_pybytes(), LIMITS)
    for req in (from_json, from_arrow):
        _valid(req)
        assert req.user_ids.tolist() == users
        assert [row[:n].tolist() for row, n in zip(req.candidates, req.n_candidates, strict=True)] == cands


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_arrow_are_a_request_or_a_bad_request(body: bytes) -> None:
    try:
        _valid(parse_arrow(body, LIMITS))
    except BadRequest as exc:
        assert exc.status in (400, 413, 422) and exc.field


def test_raw_item_ids_map_through_the_versions_catalogue() -> None:
    """Raw ids (0 included) become the catalogue's dense ids, padding stays 0; an id the catalogue lacks,
    or a dense id beyond the model's items with ?dense_ids=true, is refused naming its position."""
    items = ItemIds.from_raw_items(np.array([70, 0, 12**15, 5]))  # dense ids 1..4
    req = parse_json(json.dumps({"user_ids": [1, 2], "candidates": [[5, 0, 70], [12**15]]}).encode(), LIMITS)
    dense = to_dense_items(req, items, n_items=4)
    assert dense.dense_ids and dense.candidates.tolist() == [[4, 2, 1], [3, 0, 0]]
    unknown = parse_json(b'{"user_ids": [1, 2], "candidates": [[5], [70, 6]]}', LIMITS)
    with pytest.raises(BadRequest, match="item 6 is not in the model's item catalogue") as exc:
        to_dense_items(unknown, items, n_items=4)
    assert exc.value.field == "candidates[1][1]"
    as_dense = parse_json(b'{"user_ids": [1], "candidates": [[4, 5]]}', LIMITS, dense_ids=True)
    with pytest.raises(BadRequest, match="not one of the model's items 1..4") as exc:
        to_dense_items(as_dense, items, n_items=4)
    assert exc.value.field == "candidates[0][1]"
    with pytest.raises(BadRequest) as exc:  # 0 is the padding item, never a dense candidate
        parse_json(b'{"user_ids": [1], "candidates": [[0]]}', LIMITS, dense_ids=True)
    assert exc.value.field == "candidates[0][0]"


def test_text_user_ids_are_keyed_by_the_serving_versions_scheme() -> None:
    """Text user ids parse as sent and are keyed by the version that scores them (blake2b-63: every id as
    its text, integers too, as `ckv data prepare` keyed them); a store keyed by integers refuses text."""
    req = parse_json(json.dumps({"user_ids": ["u-1", 17], "candidates": [[3], [4]]}).encode(), LIMITS)
    assert req.raw_users == ("u-1", 17) and not req.users_keyed
    keyed = key_users(req, BLAKE2B_63)
    assert keyed.user_ids.tolist() == [key_of("u-1"), key_of("17")] and key_users(keyed, INT) is keyed
    ints = parse_json(b'{"user_ids": [17], "candidates": [[3]]}', LIMITS)
    assert ints.raw_users is None and key_users(ints, INT).user_ids.tolist() == [17]
    assert key_users(ints, BLAKE2B_63).user_ids.tolist() == [key_of("17")]
    with pytest.raises(BadRequest) as exc:
        key_users(req, INT)
    assert (exc.value.status, exc.value.field) == (422, "user_ids[0]") and "'int'" in exc.value.message
    for bad, field in (([""], "user_ids[0]"), (["a" * 257], "user_ids[0]"), (["u", 1.5], "user_ids[1]"),
                       (["u", -1], "user_ids[1]"), (["u", None], "user_ids[1]")):
        with pytest.raises(BadRequest) as exc:
            parse_json(json.dumps({"user_ids": bad, "candidates": [[1]] * len(bad)}).encode(), LIMITS)
        assert exc.value.field == field
    table = pa.table({"user_id": pa.array(["u-1", "u-2"]), "candidates": pa.array([[3], [4, 5]])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    arrow = parse_arrow(sink.getvalue().to_pybytes(), LIMITS)
    assert arrow.raw_users == ("u-1", "u-2")
    assert key_users(arrow, BLAKE2B_63).user_ids.tolist() == [key_of("u-1"), key_of("u-2")]


def _stream(table: pa.Table, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_compressed_arrow_is_read_and_its_decoded_size_checked_first() -> None:
    """A compressed stream within the limits reads as the plain one; one that decodes past them is a 413 read from
    its metadata (a body of a few KiB asking for 16 MB), before any buffer is decompressed."""
    limits = Limits(max_users=64, max_candidates=8)
    table = pa.table({"user_id": pa.array([7, 8], pa.int64()),
                      "candidates": pa.array([[11, 12], [13]], pa.list_(pa.int64()))})
    plain = parse_arrow(_stream(table), limits)
    for codec in ("zstd", "lz4"):
        got = parse_arrow(_stream(table, codec), limits)
        assert np.array_equal(got.user_ids, plain.user_ids) and np.array_equal(got.candidates, plain.candidates)
    zeros = pa.table({"user_id": pa.array(np.zeros(2_000_000, np.int64))})
    body = _stream(zeros, "zstd")
    assert len(body) < 4096
    with pytest.raises(BadRequest, match="decodes to more than 64 users") as err:
        parse_arrow(body, limits)
    assert err.value.status == 413 and err.value.field == "body"


@pytest.mark.parametrize("offsets", [(0, 2, 1000), (5, 6, 7), (-8, 2, 3)])
def test_arrow_with_broken_offsets_is_a_400_not_a_scoring_failure(offsets: tuple[int, int, int]) -> None:
    import struct

    table = pa.table({"user_id": pa.array([7, 8], pa.int64()),
                      "candidates": pa.array([[11, 12], [13]], pa.list_(pa.int64()))})
    body = bytearray(_stream(table))
    at = bytes(body).find(struct.pack("<3i", 0, 2, 3))  # the list's offsets buffer
    body[at : at + 12] = struct.pack("<3i", *offsets)
    with pytest.raises(BadRequest, match="not a valid Arrow IPC stream") as err:
        parse_arrow(bytes(body), Limits(64, 8))
    assert err.value.status == 400


@pytest.mark.parametrize(("text", "why"), [("", "1..256 characters"), ("x" * 257, "1..256 characters"),
                                           ("\ud800", "lone surrogate")])
def test_text_user_ids_are_checked_alike_in_json_and_arrow(text: str, why: str) -> None:
    with pytest.raises(BadRequest, match=why) as err:
        parse_json(json.dumps({"user_ids": [text], "candidates": [[1]]}).encode(), Limits(64, 8))
    assert err.value.field == "user_ids[0]"
    if "surrogate" in why:
        return  # Arrow strings are UTF-8: a lone surrogate cannot be written in one
    body = _stream(pa.table({"user_id": pa.array([text]), "candidates": pa.array([[1]], pa.list_(pa.int64()))}))
    with pytest.raises(BadRequest, match=why) as err:
        parse_arrow(body, Limits(64, 8))
    assert err.value.field == "user_id[0]"


@pytest.mark.parametrize(("body", "field"), [
    (b'{"user_ids": [1, ' + b"9" * 5000 + b'], "candidates": [[1], [2]]}', "user_ids[1]"),
    (b'{"user_ids": ["u", -' + b"9" * 5000 + b'], "candidates": [[1], [2]]}', "user_ids[1]"),
    (b'{"user_ids": [1, 2], "candidates": [[1], [3, ' + b"7" * 4400 + b"]]}", "candidates[1][1]"),
])
def test_a_json_integer_too_long_for_python_is_named_like_any_value_out_of_range(body: bytes, field: str) -> None:
    """Python refuses int() of over 4,300 digits; such an id is out of range, not an unreadable body."""
    with pytest.raises(BadRequest, match="an integer of 4[0-9]{3} digits|an integer of 5000 digits") as err:
        parse_json(body, LIMITS)
    assert (err.value.status, err.value.field) == (422, field)
