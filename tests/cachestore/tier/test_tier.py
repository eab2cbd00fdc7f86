"""The resident tier (cachestore/tier) in the runtime: capacity, whole-store and cache modes, asynchronous
admission with CRC checks, the requests it refuses — on CPU against a real published LMDB store; the CUDA graph path
where a GPU is. (Its policies and lookup kernel alone: test_policies_and_lookup.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.store.publish import open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import RecordError, user_key
from collectivekv.cachestore.tier.tier import CACHE, WHOLE, store_bytes
from tests.model.test_model import N_ITEMS, make_model, small_config
from tests.store_fixtures import put_in_place, store_of_model

VERSION = "0123456789abcdef"
SEQ = 8
USERS = list(range(0, 40, 2)) + [41, 43]  # odd ids below 40 are absent (cold start)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _build(root: Path) -> dict:
    model = make_model(small_config(kv_mode="collective"), seed=1).eval()
    g = torch.Generator().manual_seed(5)
    n = len(USERS)
    lengths = torch.randint(0, SEQ + 1, (n,), generator=g)
    lengths[:3] = torch.tensor([0, 1, SEQ])
    items = torch.randint(1, N_ITEMS + 1, (n, SEQ), generator=g)
    feedback = torch.randint(1, 3, (n, SEQ), generator=g)
    pad = torch.arange(SEQ).unsqueeze(0) >= lengths.unsqueeze(1)
    items[pad], feedback[pad] = 0, 0
    store_of_model(root, model, VERSION, USERS, items, feedback, lengths, "collective", "float16")
    return {"model": model, "root": root, "reader": StoreReader(open_current(root))}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _build(tmp_path_factory.mktemp("tier-store"))


def _runtime(store: dict, **kw: object) -> DecodeRuntime:
    return DecodeRuntime(store["model"], VERSION, store["reader"], ServingConfig(device="cpu", batch_users=4), **kw)


def _slot_bytes(store: dict) -> int:
    return (store["reader"].layout.record_size(SEQ) + 7) & -8


# ------------------------------------------------------------------------------------------ capacity


def test_capacity_plan_and_modes(store: dict) -> None:
    """tier_bytes None on CPU: off; >= the data file: whole store; smaller: cache of uniform slots."""
    assert _runtime(store).tier is None and _runtime(store, tier_bytes=0).tier is None
    whole = _runtime(store, tier_bytes=store_bytes(store["reader"]))
    assert whole.tier.mode == WHOLE and whole.tier.entries_resident == len(USERS)
    assert whole.tier.index.keys.tolist() == sorted(USERS)
    slot = _slot_bytes(store)
    cache = _runtime(store, tier_bytes=5 * slot + slot // 2)
    assert cache.tier.mode == CACHE and cache.tier.slots == 5 and cache.tier.slot_bytes == slot
    assert cache.tier.arena.numel() == cache.tier.header_bytes + (5 + 4) * slot  # header area, slots, staging
    with pytest.raises(ValueError, match="holds no slot"):
        _runtime(store, tier_bytes=slot - 8)
    with pytest.raises(ValueError, match="policy must be one of"):
        ServingConfig(policy="mru")
    cache.close()


def _request(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = rng.integers(0, 44, n)
    return ids, rng.integers(1, N_ITEMS + 1, (n, 3)), rng.integers(1, 4, n)


def test_whole_store_scores_equal_lmdb(store: dict) -> None:
    rng = np.random.default_rng(0)
    direct = _runtime(store, tier_bytes=0)
    tier = _runtime(store, tier_bytes=1 << 30)
    for _ in range(3):
        ids, cand, n_cand = _request(rng, 9)
        want, got = direct.score(ids, cand, n_cand), tier.score(ids, cand, n_cand)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        assert got.cold_start.tolist() == want.cold_start.tolist()
        assert got.model_version == VERSION
    present = tier.stats.users - tier.stats.cold_start_users
    assert tier.stats.tier_hits == present and tier.stats.tier_misses == 0
    assert tier.tier.counters.hits == present and tier.tier.counters.cold == tier.stats.cold_start_users


# ------------------------------------------------------------------------------------------ cache mode


@given(policy=st.sampled_from(["lru", "s3fifo"]), slots=st.integers(1, 6), seed=st.integers(0, 10_000),
       sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8), drain=st.booleans())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cache_scores_equal_lmdb_under_eviction(store: dict, policy: str, slots: int, seed: int, sizes: list[int],
                                                drain: bool) -> None:
    """Any request sequence through a tier smaller than the store (evicting, admitting in the background,
    drained or racing the next request) scores exactly as reading LMDB directly."""
    rng = np.random.default_rng(seed)
    direct = _runtime(store, tier_bytes=0)
    rt = _runtime(store, tier_bytes=slots * _slot_bytes(store), policy=policy)
    try:
        for n in sizes:
            ids, cand, n_cand = _request(rng, n)
            want, got = direct.score(ids, cand, n_cand), rt.score(ids, cand, n_cand)
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert got.cold_start.tolist() == want.cold_start.tolist()
            if drain:
                rt.tier.drain()
        rt.tier.drain()
        t = rt.tier
        assert t.entries_resident <= slots and t.entries_resident == len(t.policy)
        assert t.counters.admitted - t.counters.evictions == t.entries_resident
        assert rt.stats.tier_hits + rt.stats.tier_misses == rt.stats.users - rt.stats.cold_start_users
    finally:
        rt.close()


def test_admission_is_asynchronous_and_counted(store: dict) -> None:
    rt = _runtime(store, tier_bytes=3 * _slot_bytes(store), policy="lru")
    ids, cand = np.array([2, 4, 5]), np.ones((3, 1), dtype=np.int64)  # 5 is absent: cold, never admitted
    first = rt.score(ids, cand)
    assert first.stats.tier_misses == 2 and first.stats.tier_hits == 0
    assert rt.tier._thread.name == "tier-admission" and rt.tier._thread.is_alive()
    rt.tier.drain()
    second = rt.score(ids, cand)
    assert second.stats.tier_hits == 2 and second.stats.tier_misses == 0
    np.testing.assert_array_equal(second.logits, first.logits)
    rt.score(np.array([6, 8]), np.ones((2, 1), dtype=np.int64))
    rt.tier.drain()
    third = rt.score(np.array([0]), np.ones((1, 1), dtype=np.int64))  # admits 6, 8, then 0: evicts 2 and 4 (LRU)
    rt.tier.drain()
    assert rt.stats.tier_evictions + third.stats.tier_evictions >= 2 and 2 not in rt.tier.policy
    rt.close()


def test_whole_store_load_in_chunks_and_refuses_damage(store: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-store load streams through a staging buffer of LOAD_CHUNK bytes (here a few records per chunk)
    into the same arena; a record damaged after publish fails the open, naming the user."""
    import collectivekv.cachestore.tier.tier as tier_mod

    want = _runtime(store, tier_bytes=1 << 30)
    monkeypatch.setattr(tier_mod, "LOAD_CHUNK", 200)
    small = _runtime(store, tier_bytes=1 << 30)
    assert torch.equal(small.tier.arena, want.tier.arena)
    assert torch.equal(small.tier.index.offset, want.tier.index.offset)
    root = _damaged(store, tmp_path)
    with pytest.raises(RecordError, match=f"user {USERS[2]}.*CRC mismatch|CRC mismatch.*{USERS[2]}"):
        DecodeRuntime(store["model"], VERSION, StoreReader(open_current(root)),
                      ServingConfig(device="cpu", tier_bytes=1 << 30))


def _damaged(store: dict, tmp_path: Path) -> Path:
    """A copy of the store with USERS[2]'s payload damaged after publish (headers intact)."""
    root = tmp_path / "damaged"
    shutil.copytree(store["root"], root, symlinks=True)
    env = lmdb.open(str(open_current(root) / "lmdb"), subdir=True, lock=False, readonly=True)
    with env.begin() as txn:
        raw = bytearray(txn.get(user_key(USERS[2])))  # length SEQ: a payload to damage
    env.close()
    raw[32] ^= 0xFF  # the low (mantissa) byte of the first user-part value: still a finite number
    put_in_place(open_current(root), {USERS[2]: bytes(raw)})
    return root


def test_crc_failure_on_admission_is_not_admitted(store: dict, tmp_path: Path) -> None:
    """A record whose payload was damaged after publish (headers intact): scored from LMDB as read (the fetch
    checks headers only), refused by the admission CRC check, counted, and fetched again next time."""
    reader = StoreReader(open_current(_damaged(store, tmp_path)))
    rt = DecodeRuntime(store["model"], VERSION, reader, ServingConfig(device="cpu", batch_users=4,
                                                                     tier_bytes=4 * _slot_bytes(store)))
    ids, cand = np.array([USERS[2], USERS[3]]), np.ones((2, 1), dtype=np.int64)
    rt.score(ids, cand)
    rt.tier.drain()
    assert rt.tier.counters.admission_errors == 1 and rt.tier.counters.admitted == 1
    assert USERS[2] not in rt.tier.policy and USERS[3] in rt.tier.policy
    again = rt.score(ids, cand)
    assert again.stats.tier_misses == 1 and again.stats.tier_hits == 1
    assert rt.stats.tier_admission_errors == 1
    rt.close()


def test_verify_crc_refuses_a_damaged_miss_before_scoring(store: dict, tmp_path: Path) -> None:
    """With verify_crc the tier's misses are CRC-checked when fetched, as the LMDB path's records are: a damaged
    record is refused naming its user on every request, never scored from its damaged bytes."""
    reader = StoreReader(open_current(_damaged(store, tmp_path)))
    rt = DecodeRuntime(store["model"], VERSION, reader, ServingConfig(device="cpu", batch_users=4, verify_crc=True,
                                                                     tier_bytes=4 * _slot_bytes(store)))
    assert rt.tier.mode == CACHE
    for _ in range(2):
        with pytest.raises(RecordError, match=f"user {USERS[2]}.*CRC mismatch|CRC mismatch.*{USERS[2]}"):
            rt.score(np.array([USERS[3], USERS[2]]), np.ones((2, 1), dtype=np.int64))
    assert rt.score(np.array([USERS[3]]), np.ones((1, 1), dtype=np.int64)).logits.shape[0] == 1
    rt.close()


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("tier", ["whole", "cache"])
def test_cuda_resident_graph_equals_cpu(store: dict, tier: str) -> None:
    """The resident request replayed as one CUDA graph (lookup by searchsorted in the graph for the whole
    store, host-resolved slots with misses for the cache) == the CPU runtime reading LMDB."""
    rng = np.random.default_rng(3)
    cpu = _runtime(store, tier_bytes=0)
    tier_bytes = 1 << 30 if tier == "whole" else 3 * _slot_bytes(store)
    rt = DecodeRuntime(make_model(store["model"].cfg, seed=1).eval(), VERSION, store["reader"],
                       ServingConfig(device="cuda", batch_users=4, tier_bytes=tier_bytes))
    assert rt.tier.mode == (WHOLE if tier == "whole" else CACHE) and rt.tier.arena.is_cuda
    for _ in range(4):
        ids, cand, n_cand = _request(rng, 7)
        want, got = cpu.score(ids, cand, n_cand), rt.score(ids, cand, n_cand)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-3, atol=1e-3)
        assert got.cold_start.tolist() == want.cold_start.tolist()
    assert rt._resident and all(r._captured is not None for r in rt._resident.values())
    rt.close()


@pytest.mark.parametrize("tier_bytes", [0, 1 << 30])
@pytest.mark.parametrize("ids", [[-5], np.array([2**63 + 5], dtype=np.uint64), [2**63], [2.7], [True]])
def test_a_user_id_that_is_no_store_key_is_refused_not_scored_cold(store: dict, tier_bytes: int, ids: object) -> None:
    """Negative ids (-1 pads the tier's lookup), ids >= 2^63 (a uint64 or a Python int would wrap), floats, bools:
    an error naming the position with the tier on or off, never a cold-start score."""
    from collectivekv.cachestore.store.user_keys import UserKeyError

    rt = _runtime(store, tier_bytes=tier_bytes)
    with pytest.raises(UserKeyError, match=r"user_ids\[0\]: ids are integers 0..2\^63-1"):
        rt.score(ids, np.ones((1, 1), dtype=np.int64))
    rt.close()


def test_a_tier_is_refused_with_pad_to_below_the_stores_max_len(store: dict) -> None:
    """The tier decodes at L = pad_to: a shorter pad_to would cut longer histories silently."""
    with pytest.raises(ValueError, match="pad_to 3 < the store's max_len 8"):
        DecodeRuntime(store["model"], VERSION, store["reader"], ServingConfig(device="cpu", batch_users=4, pad_to=3,
                                                                              tier_bytes=1 << 30))
    rt = _runtime(store, pad_to=SEQ, tier_bytes=1 << 30)  # at max_len: served
    assert rt.tier is not None
    rt.close()


def test_a_closed_runtime_refuses_requests_and_close_waits_for_the_one_in_flight(store: dict) -> None:
    import threading

    rt = _runtime(store, tier_bytes=1 << 30)
    rt.close()
    rt.close()  # twice: nothing more to let go of
    with pytest.raises(RuntimeError, match="is closed"):
        rt.score([USERS[0]], [[1]])
    rt = _runtime(store)
    errors: list[BaseException] = []

    def requests() -> None:
        for _ in range(200):
            try:
                rt.score(USERS[:4], np.ones((4, 2), dtype=np.int64))
            except RuntimeError as exc:  # after close: refused, never a half-torn-down runtime's error
                if "is closed" not in str(exc):
                    errors.append(exc)
                return
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    worker = threading.Thread(target=requests)
    worker.start()
    rt.close()
    worker.join()
    assert errors == []


@pytest.mark.parametrize(("n_candidates", "message"), [([1], "2 integer counts expected"),
                                                        ([1, -1], r"n_candidates\[1\]: -1 is not a count of 0..2"),
                                                        ([3, 1], r"n_candidates\[0\]: 3 is not a count of 0..2"),
                                                        ([1.0, 2.0], "integer counts")])
def test_candidate_counts_are_checked_not_clipped(store: dict, n_candidates: list, message: str) -> None:
    rt = _runtime(store)
    with pytest.raises(ValueError, match=message):
        rt.score(USERS[:2], np.ones((2, 2), dtype=np.int64), n_candidates)
    rt.close()


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (0, 0)])
def test_no_candidates_answer_empty_with_the_same_cold_flags_through_the_tier(store: dict, shape: tuple) -> None:
    """Users with no candidates are still looked up: both paths answer (B, 0) logits and the same cold flags."""
    ids = [0, 1, 2][: shape[0]]  # 1 is absent: cold start
    cand = np.zeros(shape, dtype=np.int64)
    direct, tier = _runtime(store, tier_bytes=0), _runtime(store, tier_bytes=1 << 30)
    want, got = direct.score(ids, cand), tier.score(ids, cand)
    assert got.logits.shape == want.logits.shape == shape
    assert got.cold_start.tolist() == want.cold_start.tolist() == [False, True, False][: shape[0]]
    direct.close()
    tier.close()
