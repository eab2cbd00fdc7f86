"""cachestore/store/user_keys.py: the one raw id → int64 key function serving and data preparation share."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from collectivekv.cachestore.store.user_keys import (
    BLAKE2B_63,
    INT,
    UserKeyError,
    first_collision,
    hash_texts,
    key_of,
    read_key_scheme,
    to_keys,
)
from tests.helpers import repo_env

# pinned: a change of the function would re-key every stored user
PINNED = {"u1": 5281779755554125162, "17": 1161021099008769498,
          "3f2a9c1e-0b7d-4e55-9a51-2c8f0e6d4b21": key_of("3f2a9c1e-0b7d-4e55-9a51-2c8f0e6d4b21")}


def test_key_is_blake2b_64_big_endian_shifted_and_pinned() -> None:
    for text, key in PINNED.items():
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        assert key_of(text) == int.from_bytes(digest, "big") >> 1 == key
        assert 0 <= key < 2**63
    assert key_of("u1") == 5281779755554125162 and key_of("17") == 1161021099008769498
    assert key_of("é") != key_of("e")  # UTF-8 bytes, no normalisation


def test_stable_across_processes() -> None:
    """Never Python's hash(): a fresh interpreter (another hash seed) computes the same keys."""
    code = "from collectivekv.cachestore.store.user_keys import key_of; print(key_of('u1'), key_of('17'))"
    out = subprocess.run([sys.executable, "-c", code], env=repo_env(PYTHONHASHSEED="12345"), capture_output=True,
                         text=True, check=True).stdout.split()
    assert [int(v) for v in out] == [PINNED["u1"], PINNED["17"]]


def test_hash_texts_matches_key_of() -> None:
    texts = ["", "a", "u1", "17", "x" * 300, "日本"]
    assert hash_texts(texts).tolist() == [key_of(t) for t in texts]
    assert hash_texts([]).dtype == np.int64 and len(hash_texts([])) == 0


def test_to_keys_per_scheme() -> None:
    assert to_keys([17, "17", np.int64(17)], BLAKE2B_63).tolist() == [PINNED["17"]] * 3  # an int is its digits
    assert to_keys(np.array([[1, 2]]), BLAKE2B_63).shape == (1, 2)
    assert to_keys([0, 2**63 - 1], INT).tolist() == [0, 2**63 - 1]
    assert to_keys(np.array([5], np.uint64), INT).tolist() == [5]
    for bad, scheme, match in ((["u1"], INT, "not an integer"), ([-1], INT, "outside"), ([2**63], INT, "outside"),
                               ([True], INT, "not an integer"), ([1.5], BLAKE2B_63, "not text or an integer"),
                               ([None], BLAKE2B_63, "not text or an integer")):
        with pytest.raises(UserKeyError, match=match):
            to_keys(bad, scheme)
    with pytest.raises(UserKeyError, match="unknown id key scheme"):
        to_keys([1], "md5")


def test_first_collision() -> None:
    texts = ["a", "b", "c"]
    assert first_collision(texts, np.array([3, 1, 2])) is None
    assert first_collision(texts, np.array([3, 9, 3])) == ("a", "c", 3)


def test_read_key_scheme(tmp_path: Path) -> None:
    assert read_key_scheme(tmp_path) == INT  # nothing recorded: integer ids
    (tmp_path / "manifest.json").write_text(json.dumps({"user_key": BLAKE2B_63}))
    assert read_key_scheme(tmp_path) == BLAKE2B_63 and read_key_scheme(tmp_path, "item_key") == INT
    (tmp_path / "manifest.json").write_text(json.dumps({"user_key": "sha1"}))
    with pytest.raises(UserKeyError):
        read_key_scheme(tmp_path)
