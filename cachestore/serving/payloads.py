"""Request and response bodies of ``POST /score``.

Two encodings, chosen by the request's Content-Type:

* JSON (``application/json``)::

      {"user_ids": [17, 42], "candidates": [[3, 9, 12], [5]]}

  one candidate list per user (1..max_candidates items each, lists may differ in length). Reply::

      {"model_version": "…", "store_version": "…", "scores": [[0.41, 0.07, 0.66], [0.52]],
       "cold_start": [false, true]}

* Arrow IPC stream (``application/vnd.apache.arrow.stream``), for large batches: one table with
  columns ``user_id`` (integers) and ``candidates`` (list of integers), no nulls. Reply: a stream with
  ``user_id`` (int64), ``scores`` (list<float32>) and ``cold_start`` (bool); the schema metadata holds
  ``model_version`` and ``store_version``.

A score is the click probability (sigmoid of the logit). Ids are integers 0..2^63-1; user ids may also be
text (a hash, a UUID) when the served store keys users by text (manifest ``user_key`` "blake2b-63",
cachestore/store/user_keys.py): each is keyed as ``ckv data prepare`` keyed it (an integer stands for its
decimal text there), by the version that scores the request (:func:`key_users`); a store keyed by
integers refuses text ids with a 422 naming the position. The Arrow reply echoes text ids as strings. Candidates are
raw item ids (the event log's), mapped to the model's dense ids through the item catalogue of the version
that scores the request (:func:`to_dense_items`; an id the catalogue lacks is refused naming its
position); with the query parameter ``?dense_ids=true`` they are the model's dense ids 1..n_items (0 is
the padding item). Anything else is a :class:`BadRequest` naming the field
(``user_ids[3]``, ``candidates[1][0]``), answered with a 4xx; nothing a client sends reaches the runtime
unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np
import orjson

from collectivekv.cachestore.serving.arrow_limits import read_stream
from collectivekv.cachestore.serving.errors import BadRequest
from collectivekv.cachestore.store.item_ids import ItemIds, raw_to_dense
from collectivekv.cachestore.store.user_keys import INT, UserKeyError, to_keys

ARROW_MIME = "application/vnd.apache.arrow.stream"
JSON_MIME = "application/json"
_MAX_ID = (1 << 63) - 1
_MAX_TEXT_ID = 256  # characters of one text user id


@dataclass(frozen=True)
class Limits:
    """Per-request limits (from :class:`cachestore.serving.config.ServerConfig`)."""

    max_users: int
    max_candidates: int


@dataclass(frozen=True)
class ScoreRequest:
    """A validated request. user_ids (B,) int64 >= 0; candidates (B, C) int64, row i holds
    n_candidates[i] >= 1 real items then 0-padding; C = max(n_candidates). Items are raw ids (>= 0), or the
    model's dense ids (>= 1) when ``dense_ids``."""

    user_ids: np.ndarray
    candidates: np.ndarray
    n_candidates: np.ndarray
    dense_ids: bool = False  # candidates are the model's dense ids (else raw ids, mapped per version)
    raw_users: tuple[str | int, ...] | None = None  # the user ids as sent, when any is text (user_ids: zeros)
    users_keyed: bool = False  # user_ids are the store's keys (:func:`key_users` ran)
    users_field: str = "user_ids"  # how the request names its user ids (Arrow: the column "user_id")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class ScoreReply:
    """What one request gets back: scores (B, C) float32 probabilities (NaN in padding), cold_start
    (B,) bool, and the versions (store version id, checkpoint model version) that scored it."""

    scores: np.ndarray
    cold_start: np.ndarray
    model_version: str
    store_version: str


_INT_ONLY = {int}


class _Digits(str):
    """A JSON integer too long for ``int`` (Python refuses over 4,300 digits): kept as its text, so the value
    is named like any other out of range instead of failing the whole body."""


def _json_int(text: str) -> int | _Digits:
    return int(text) if len(text) <= 40 else _Digits(text)  # 2^63 has 19 digits: 40 is out of range either way


def _shown(v: object) -> str:
    """A value for an error message (40 characters at most)."""
    if type(v) is _Digits:
        return f"an integer of {len(v.lstrip('-'))} digits"
    return json.dumps(v)[:40]


def _type_name(v: object) -> str:
    return "int" if type(v) is _Digits else type(v).__name__


def _bad_int(values: list, field: str, low: int) -> BadRequest:
    for i, v in enumerate(values):
        if type(v) is not int or not low <= v <= _MAX_ID:
            return BadRequest(f"{field}[{i}]", f"must be an integer {low}..2^63-1, got {_shown(v)}")
    return BadRequest(field, "invalid integers")  # not reached: the caller saw a bad value


def _int_array(values: list, field: str, low: int) -> np.ndarray:
    """Python ints (no bools, floats, NaN, strings) in low..2^63-1 → int64 array."""
    if values and set(map(type, values)) != _INT_ONLY:  # no bools (an int subclass), floats, NaN, strings
        raise _bad_int(values, field, low)
    if values and (min(values) < low or max(values) > _MAX_ID):
        raise _bad_int(values, field, low)
    return np.array(values, dtype=np.int64)


def _check_sizes(n_users: int, lengths: np.ndarray, limits: Limits) -> None:
    if n_users == 0:
        raise BadRequest("user_ids", "is empty: send at least one user")
    if n_users > limits.max_users:
        raise BadRequest("user_ids", f"{n_users} users exceed the limit of {limits.max_users} per request: "
                                     "split the request", 413)
    if (lengths < 1).any():
        raise BadRequest(f"candidates[{int(np.argmax(lengths < 1))}]", "is empty: give each user >= 1 candidate")
    if (lengths > limits.max_candidates).any():
        i = int(np.argmax(lengths > limits.max_candidates))
        raise BadRequest(f"candidates[{i}]", f"{int(lengths[i])} candidates exceed the limit of "
                                             f"{limits.max_candidates} per user", 413)


def _padded(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated rows + their lengths → (B, max length) 0-padded."""
    if (lengths == lengths[0]).all():  # every row as long: a view, no mask
        return flat.reshape(len(lengths), int(lengths[0]))
    out = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
    out[np.arange(out.shape[1])[None, :] < lengths[:, None]] = flat
    return out


def parse_json(body: bytes, limits: Limits, dense_ids: bool = False) -> ScoreRequest:
    """A JSON body → :class:`ScoreRequest` (BadRequest naming the field otherwise). orjson reads it (an integer
    beyond 64 bits as a float); what orjson refuses but ``json`` reads (NaN, Infinity, integers of hundreds of
    digits, other encodings) is read by ``json``, so such values are named like any other out-of-range value."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = _stdlib_json(body)
    return _request(doc, limits, dense_ids)


def _stdlib_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_int=_json_int)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body", f"is not JSON ({exc})", 400) from None
    except RecursionError:
        raise BadRequest("body", "is nested too deeply", 400) from None


def _request(doc: object, limits: Limits, dense_ids: bool) -> ScoreRequest:
    if not isinstance(doc, dict):
        raise BadRequest("body", "must be a JSON object with user_ids and candidates", 400)
    for name in ("user_ids", "candidates"):
        if name not in doc:
            raise BadRequest(name, "is missing")
        if not isinstance(doc[name], list):
            raise BadRequest(name, f"must be a list, got {_type_name(doc[name])}")
    ids, rows = doc["user_ids"], doc["candidates"]
    if len(rows) != len(ids):
        raise BadRequest("candidates", f"has {len(rows)} lists for {len(ids)} user_ids: give one list per user")
    return _plain_request(ids, rows, limits, dense_ids) or _checked_request(ids, rows, limits, dense_ids)


def _plain_request(ids: list, rows: list, limits: Limits, dense_ids: bool) -> ScoreRequest | None:
    """The request when every value is in range (integer user ids, every list within the limits): plain
    Python checks, two numpy conversions. None otherwise — :func:`_checked_request` then finds and names
    the first bad value."""
    lengths = [len(r) if type(r) is list else 0 for r in rows]
    if not ids or len(ids) > limits.max_users or min(lengths) < 1 or max(lengths) > limits.max_candidates:
        return None
    flat = list(chain.from_iterable(rows))
    if set(map(type, ids)) != _INT_ONLY or set(map(type, flat)) != _INT_ONLY:
        return None
    if min(ids) < 0 or max(ids) > _MAX_ID or min(flat) < (1 if dense_ids else 0) or max(flat) > _MAX_ID:
        return None
    items, n_cand = np.array(flat, dtype=np.int64), np.array(lengths, dtype=np.int64)
    width = max(lengths)
    candidates = items.reshape(len(ids), width) if min(lengths) == width else _padded(items, n_cand)
    return ScoreRequest(np.array(ids, dtype=np.int64), candidates, n_cand, dense_ids)


def _checked_request(ids: list, rows: list, limits: Limits, dense_ids: bool) -> ScoreRequest:
    """The request, value by value; BadRequest naming the first value out of range."""
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise BadRequest(f"candidates[{i}]", f"must be a list of item ids, got {_type_name(row)}")
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    _check_sizes(len(ids), lengths, limits)
    user_ids, raw_users = _json_users(ids)
    flat = list(chain.from_iterable(rows))
    try:
        items = _int_array(flat, "candidates", 1 if dense_ids else 0)
    except BadRequest as exc:  # name the row and column of the first bad item
        j = int(exc.field.rpartition("[")[2].rstrip("]"))
        row = int(np.searchsorted(np.cumsum(lengths), j, side="right"))
        col = j - int(lengths[:row].sum())
        raise BadRequest(f"candidates[{row}][{col}]", exc.message) from None
    return ScoreRequest(user_ids, _padded(items, lengths), lengths, dense_ids, raw_users)


def _json_users(ids: list) -> tuple[np.ndarray, tuple | None]:
    """(user_ids, raw_users): integers as an int64 array; with any text id, the ids as sent (text of at most
    _MAX_TEXT_ID characters, or integers) and zeros until :func:`key_users` keys them."""
    if not any(type(v) is str for v in ids):
        return _int_array(ids, "user_ids", 0), None
    for i, v in enumerate(ids):
        if type(v) is str:
            _check_text_id(v, f"user_ids[{i}]")
        elif type(v) is not int or not 0 <= v <= _MAX_ID:
            raise BadRequest(f"user_ids[{i}]", f"must be a text id or an integer 0..2^63-1, got {_shown(v)}")
    return np.zeros(len(ids), np.int64), tuple(ids)


def _check_text_id(v: str, field: str) -> None:
    """BadRequest naming ``field`` unless ``v`` is 1.._MAX_TEXT_ID characters of text UTF-8 can encode (JSON's
    ``\\ud800`` escapes decode to lone surrogates, which it cannot)."""
    if not 0 < len(v) <= _MAX_TEXT_ID:
        raise BadRequest(field, f"text ids are 1..{_MAX_TEXT_ID} characters, got {len(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(field, "is not valid Unicode text (a lone surrogate)") from None


def key_users(request: ScoreRequest, scheme: str) -> ScoreRequest:
    """The request with its user ids as the store's keys under the serving version's key ``scheme``
    (cachestore/store/user_keys.py); BadRequest naming the first id the scheme cannot key."""
    if request.users_keyed:
        return request
    if scheme == INT and request.raw_users is None:
        return replace(request, users_keyed=True)
    if scheme == INT:
        raw_users = request.raw_users or ()
        i = next(i for i, v in enumerate(raw_users) if type(v) is str)
        raise BadRequest(f"{request.users_field}[{i}]", "is text, and the served store keys users by integer ids "
                         f"(user_key 'int'): send integers 0..2^63-1, got {json.dumps(raw_users[i])[:40]}")
    raw = list(request.raw_users) if request.raw_users is not None else request.user_ids
    try:
        keys = to_keys(raw, scheme, where="user_ids")
    except UserKeyError as exc:
        raise BadRequest(request.users_field, f"{exc} (the served store keys users by {scheme!r})") from None
    return replace(request, user_ids=keys, users_keyed=True)


def _arrow_ints(column, field: str, low: int) -> np.ndarray:  # noqa: ANN001 (pyarrow array)
    import pyarrow as pa

    if column.null_count:
        raise BadRequest(field, "has null values")
    if not pa.types.is_integer(column.type):
        raise BadRequest(field, f"has type {column.type}, expected integers")
    values = column.to_numpy(zero_copy_only=False)
    if values.size and (values.min() < low or (values.dtype == np.uint64 and values.max() > _MAX_ID)):
        i = int(np.argmax((values < low) | (values > _MAX_ID)))
        raise BadRequest(f"{field}[{i}]", f"must be an integer {low}..2^63-1, got {values[i]}")
    return values.astype(np.int64)


def parse_arrow(body: bytes, limits: Limits, dense_ids: bool = False) -> ScoreRequest:
    """An Arrow IPC stream body → :class:`ScoreRequest` (BadRequest naming the column otherwise). The stream's
    sizes are checked before any buffer is decompressed or read (:func:`cachestore.serving.arrow_limits.read_stream`);
    a body Arrow cannot decode is a 400 naming the body, never a scoring failure."""
    import pyarrow as pa

    table = read_stream(body, limits.max_users, limits.max_candidates)
    try:
        return _arrow_request(table, limits, dense_ids)
    except BadRequest:
        raise
    except (pa.ArrowException, UnicodeDecodeError, SystemError, ValueError, IndexError) as exc:
        raise BadRequest("body", f"is not a valid Arrow IPC stream ({type(exc).__name__}: {str(exc)[:120]})",
                         400) from None


def _arrow_request(table, limits: Limits, dense_ids: bool) -> ScoreRequest:  # noqa: ANN001 (pyarrow Table)
    import pyarrow as pa

    for name in ("user_id", "candidates"):
        if name not in table.column_names:
            raise BadRequest(name, f"column is missing (columns: {', '.join(table.column_names) or 'none'})")
    lists = table.column("candidates").combine_chunks()
    if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)):
        raise BadRequest("candidates", f"has type {lists.type}, expected a list of integers")
    if lists.null_count:
        raise BadRequest("candidates", "has null lists")
    lengths = lists.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    _check_sizes(table.num_rows, lengths, limits)
    users = table.column("user_id").combine_chunks()
    raw_users = None
    if pa.types.is_string(users.type) or pa.types.is_large_string(users.type):
        if users.null_count:
            raise BadRequest("user_id", "has null values")
        raw_users = tuple(users.to_pylist())
        for i, v in enumerate(raw_users):
            _check_text_id(v, f"user_id[{i}]")
        user_ids = np.zeros(len(raw_users), np.int64)
    else:
        user_ids = _arrow_ints(users, "user_id", 0)
    items = _arrow_ints(lists.flatten(), "candidates.item", 1 if dense_ids else 0)
    return ScoreRequest(user_ids, _padded(items, lengths), lengths, dense_ids, raw_users, users_field="user_id")


def to_dense_items(request: ScoreRequest, items: ItemIds, n_items: int) -> ScoreRequest:
    """The request with its candidates as the served model's dense ids: raw ids mapped through ``items``
    (the version's item catalogue), dense ids checked to be 1..``n_items``; a BadRequest naming the
    first candidate that is not one of the model's items. (Runs per request in the scoring thread: a request
    without padding — every row as long, the usual case — costs a lookup and two checks.)"""
    cands, lengths = request.candidates, request.n_candidates
    width = cands.shape[1]
    real = np.arange(width)[None, :] < lengths[:, None] if len(lengths) > 1 and lengths.min() < width else None
    if request.dense_ids:
        bad, dense = cands > n_items, None
        why = f"is not one of the model's items 1..{n_items}"
    else:
        dense, known = raw_to_dense(items.sorted_raw, items.dense, cands)
        bad, why = ~known, "is not in the model's item catalogue (send raw item ids, or ?dense_ids=true)"
    if real is not None:
        bad &= real
    if bad.any():
        row, col = (int(x) for x in np.argwhere(bad)[0])
        raise BadRequest(f"candidates[{row}][{col}]", f"item {int(cands[row, col])} {why}")
    if dense is None:
        return request
    return replace(request, candidates=dense if real is None else np.where(real, dense, 0), dense_ids=True)


def reply_json(reply: ScoreReply, n_candidates: np.ndarray) -> bytes:
    """The JSON reply (see the module docstring). Scores are written from the float32 array by orjson, each
    as the shortest decimal that reads back as the same float32 (32× faster than ``json`` over Python floats
    for 64 candidates)."""
    scores = reply.scores
    if not scores.flags.c_contiguous or scores.dtype != np.float32:  # orjson writes C-contiguous arrays only
        scores = np.ascontiguousarray(scores, dtype=np.float32)
    if len(n_candidates) > 1 or n_candidates[0] != scores.shape[1]:
        scores = [row[:n] for row, n in zip(scores, n_candidates.tolist(), strict=True)]
    doc = {"model_version": reply.model_version, "store_version": reply.store_version,
           "scores": scores, "cold_start": reply.cold_start.tolist()}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def reply_arrow(reply: ScoreReply, request: ScoreRequest) -> bytes:
    """The Arrow IPC stream reply (see the module docstring): the request's user ids as sent."""
    import pyarrow as pa

    n_candidates = request.n_candidates
    real = np.arange(reply.scores.shape[1])[None, :] < n_candidates[:, None]
    offsets = np.concatenate([[0], np.cumsum(n_candidates)]).astype(np.int32)
    scores = pa.ListArray.from_arrays(pa.array(offsets), pa.array(reply.scores[real].astype(np.float32)))
    meta = {"model_version": reply.model_version, "store_version": reply.store_version}
    users = (pa.array([str(u) for u in request.raw_users], pa.string()) if request.raw_users is not None
             else pa.array(request.user_ids, pa.int64()))
    table = pa.table({"user_id": users, "scores": scores,
                      "cold_start": pa.array(reply.cold_start)}).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()

