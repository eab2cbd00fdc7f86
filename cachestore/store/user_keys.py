"""Raw user / item ids → the int64 keys the dataset, the model and the store use (hashlib + numpy, no torch).

Every user is stored under one unsigned 64-bit LMDB key and one int64 ``user_id`` in the dataset; items are
numbered through the item catalogue by an int64 raw id. How a raw id becomes that int64 is the **key
scheme**, recorded with the data it keys (the dataset's ``meta.json``, the checkpoint's ``config.json`` and
item catalogue, the store version's ``manifest.json``: ``"user_key"``, ``"item_key"``):

``"int"``
    the raw id is an integer in 0..2**63-1 and is its own key (every dataset before text ids).
``"blake2b-63"``
    the raw id is text (a hash, a UUID, any string; an integer stands for its decimal text). Its key is
    BLAKE2b with an 8-byte digest of the UTF-8 bytes, read as a big-endian unsigned integer and shifted
    right by one bit, so it lies in 0..2**63-1::

        int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1

    Stable across processes, machines and Python versions (never the builtin ``hash()``, which is salted
    per process). ``ckv data prepare`` refuses two distinct ids of one dataset with the same key. Two of
    n distinct ids collide with probability about n² / 2**64: 5e-4 for 100M users.

Serving maps a request's raw user ids with :func:`to_keys` and the scheme of the store it serves
(:func:`read_key_scheme` on the store version directory or the checkpoint directory)::

    scheme = read_key_scheme(version_dir)            # "int" or "blake2b-63"
    keys = to_keys(["3f2a…", "u-17"], scheme)        # int64 array: the users' LMDB keys

A key scheme of ``int`` refuses text (``KeyError`` subclass :class:`UserKeyError` naming the value).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

INT = "int"
BLAKE2B_63 = "blake2b-63"
SCHEMES = (INT, BLAKE2B_63)
KEY_MAX = 2**63 - 1
_MANIFESTS = ("manifest.json", "config.json", "meta.json")  # a store version, a checkpoint, a dataset


class UserKeyError(ValueError):
    """A raw id that the key scheme cannot key (text under ``int``, a negative integer, a null...)."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise UserKeyError(f"unknown id key scheme {scheme!r}; expected one of {SCHEMES}")
    return scheme


def key_of(text: str) -> int:
    """The ``blake2b-63`` key of one raw id's text (module docstring)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def hash_texts(texts: Iterable[str]) -> np.ndarray:
    """``blake2b-63`` keys of many texts, as an int64 array (one hashlib update per text, digests joined once;
    copying a fresh 8-byte BLAKE2b state is about twice as fast as constructing one per text)."""
    fresh = hashlib.blake2b(digest_size=8)
    digests = []
    for t in texts:
        h = fresh.copy()
        h.update(t.encode("utf-8"))
        digests.append(h.digest())
    joined = b"".join(digests)
    return (np.frombuffer(joined, dtype=">u8") >> np.uint64(1)).astype(np.int64)


def id_text(value: object) -> str:
    """The text a raw id is keyed by: a string as is, an integer (Python or numpy) in decimal, bytes as UTF-8.
    Anything else (floats, booleans, None, lists) is refused: an id's text must not depend on how a file
    happened to type it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_) or value is None:
        raise UserKeyError(f"id {value!r} is not text or an integer")
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8")
    raise UserKeyError(f"id {str(value)[:40]!r} ({type(value).__name__}) is not text or an integer")


def to_keys(values: Sequence[object] | np.ndarray, scheme: str, *, where: str = "user ids") -> np.ndarray:
    """Keys (int64 array) of raw ids under ``scheme``: ``int`` takes integers in 0..2**63-1 as they are;
    ``blake2b-63`` hashes each id's text (:func:`id_text`). :class:`UserKeyError` names the first bad value."""
    check_scheme(scheme)
    if scheme == BLAKE2B_63 and isinstance(values, list) and all(type(v) is str for v in values):
        return hash_texts(values)  # the common request: a list of text ids
    arr = np.asarray(values)
    flat = arr.reshape(-1)
    if scheme == BLAKE2B_63:
        if flat.dtype.kind in "U":
            texts = flat.tolist()
        elif flat.dtype.kind in "iu":
            texts = [str(v) for v in flat.tolist()]
        else:
            texts = []
            for pos, v in enumerate(flat.tolist()):
                try:
                    texts.append(id_text(v))
                except UserKeyError as exc:
                    raise UserKeyError(f"{where}: position {pos}: {exc}") from None
        return hash_texts(texts).reshape(arr.shape)
    keys, pos, integer = _integer_ids(flat)
    if keys is None:
        v = flat.tolist()[pos]
        if not integer:
            raise UserKeyError(f"{where}: position {pos}: id {str(v)[:40]!r} is not an integer, and the "
                               "key scheme is 'int' (integer ids)")
        raise UserKeyError(f"{where}: position {pos}: id {v} is outside 0..2**63-1")
    return keys.reshape(arr.shape)


def _integer_ids(flat: np.ndarray) -> tuple[np.ndarray | None, int, bool]:
    """(int64 keys, -1, True) of flat ids that are all integers 0..2**63-1 (numpy integers of any width, Python
    ints); else (None, the position of the first that is not, whether it is an integer at all: bools are not)."""
    if flat.dtype.kind not in "iu":
        values = flat.tolist()
        for pos, v in enumerate(values):
            if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
                return None, pos, False
        flat = np.array([int(v) for v in values], dtype=object)
    bad = np.flatnonzero(np.asarray((flat < 0) | (flat > KEY_MAX), dtype=bool))
    if len(bad):
        return None, int(bad[0]), True
    return flat.astype(np.int64, copy=False), -1, True


def user_id_array(values: Sequence[object] | np.ndarray, where: str = "user_ids") -> np.ndarray:
    """``values`` as store keys: an int64 array (N,) of integers 0..2^63-1 (numpy integers of any width, Python
    ints). UserKeyError naming ``where[i]`` for anything else — a negative id (-1 pads batches), one at or above
    2^63 (a uint64 or a Python int would wrap), a float, a bool, text (key it first: :func:`to_keys`)."""
    flat = np.asarray(values).reshape(-1)
    keys, pos, _ = _integer_ids(flat)
    if keys is None:
        raise UserKeyError(f"{where}[{pos}]: ids are integers 0..2^63-1, got {flat.tolist()[pos]!r}")
    return keys


def first_collision(texts: Sequence[str], keys: np.ndarray) -> tuple[str, str, int] | None:
    """Two distinct texts (``texts`` must be distinct) with the same key, and that key; None when all differ."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    same = np.flatnonzero(sk[1:] == sk[:-1])
    if len(same) == 0:
        return None
    i = int(same[0])
    return texts[int(order[i])], texts[int(order[i + 1])], int(sk[i])


def read_key_scheme(path: str | os.PathLike, field: str = "user_key") -> str:
    """The key scheme a store version directory (``manifest.json``), a checkpoint directory (``config.json``)
    or a dataset directory (``meta.json``) records under ``field`` (``user_key`` / ``item_key``); ``int`` when
    it records none (everything written before text ids)."""
    root = Path(path)
    for name in _MANIFESTS:
        file = root / name
        if file.is_file():
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
            return check_scheme(str(data.get(field) or INT)) if isinstance(data, dict) else INT
    return INT
