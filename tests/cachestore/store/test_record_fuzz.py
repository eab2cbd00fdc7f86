"""Fuzz of the record decoder and of the serving path's record checks (hypothesis).

Random bytes, flipped bits, truncated records and router indices outside the pool, through the paths
that serve records: ``decode_entry`` (CRC), the batcher's vectorised header/size checks (the default,
and with ``verify_crc``), the eager decode (poolscore / gather) and the fused kernel (Triton's CPU
interpreter here, compiled on CUDA). Every case ends in a clear ``RecordError`` naming the user (or
the batch row where no user is known), or in exactly the scores of the undamaged batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.decode import decode, din_cache
from collectivekv.cachestore.decode.fused import FusedConfig, fused_available, fused_decode
from collectivekv.cachestore.decode.transfer import to_device
from collectivekv.cachestore.store.entry import decode_entry, encode_entry
from collectivekv.cachestore.store.record import RecordError, RouterIndexError
from tests.cachestore.decode.test_graphs import SEQ, random_records, setup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_USERS = 4


def _batch(layout, records: list[bytes], verify_crc: bool = False):
    """The host batch of these records (user ids 0..n-1) as the runtime packs it, checks included."""
    return HostBatcher(layout, pin=False, verify_crc=verify_crc).pack(np.arange(len(records)), records)


def _scores(resident, layout, records: list[bytes], path: str = "gather", verify_crc: bool = False) -> torch.Tensor:
    """Logits (n, 2) of candidates 1, 2 for each record, or the RecordError the serving path raises
    (the runtime's flag check: a flagged user is a RouterIndexError naming the user)."""
    host = _batch(layout, records, verify_crc)
    dev, _ = to_device(host, "cpu")
    flags = torch.zeros(len(records), dtype=torch.int32)
    cand = torch.tensor([[1, 2]] * len(records))
    with torch.inference_mode():
        logits = decode(resident, _cache(resident, layout, dev), cand, path, flags=flags)
    bad = torch.nonzero(flags)
    if len(bad):
        raise RouterIndexError("router index outside the pool", int(bad[0, 0]))
    return logits


def _cache(resident, layout, dev):
    """The din KVCache of a device batch (unpacked to the longest history)."""
    return din_cache(dev.unpack())


def _record(layout, n: int, k_idx: np.ndarray, v_idx: np.ndarray) -> bytes:
    """A valid record (CRC included) of n behaviours with zero user parts carrying these router indices
    (those of the shared sides)."""
    g = layout.flat_group
    parts = [np.zeros((n, g.dk), layout.dtype("kv")), np.zeros((n, g.dv), layout.dtype("kv"))]
    parts += [idx.astype(layout.dtype("idx"))[:, None] for idx, on in ((k_idx, g.k_shared), (v_idx, g.v_shared)) if on]
    return encode_entry(layout, n, parts)


@pytest.fixture(scope="module")
def base() -> dict:
    resident, layout = setup("collective", "float16")
    records = random_records(layout, [SEQ, 3, 1, SEQ], np.random.default_rng(0))
    return {"resident": resident, "layout": layout, "records": records,
            "ref": _scores(resident, layout, records)}


@settings(max_examples=60, deadline=None)
@given(user=st.integers(0, N_USERS - 1), data=st.data(),
       how=st.sampled_from(["flip", "truncate", "random", "extend"]), verify=st.booleans())
def test_damaged_record_is_an_error_or_harmless(base: dict, user: int, data: st.DataObject, how: str,
                                                verify: bool) -> None:
    """Default path (headers + sizes): damage in the header or the size → a RecordError naming the user;
    a payload flip is caught by verify_crc (and by decode_entry), never by garbage out of bounds."""
    rec = bytearray(base["records"][user])
    if how == "flip":
        at = data.draw(st.integers(0, len(rec) - 1))
        rec[at] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        rec = rec[: data.draw(st.integers(0, len(rec) - 1))]
    elif how == "extend":
        rec += data.draw(st.binary(min_size=1, max_size=16))
    else:
        rec = bytearray(data.draw(st.binary(min_size=0, max_size=len(rec) + 8)))
    records = list(base["records"])
    records[user] = bytes(rec)
    with pytest.raises(RecordError, match=f"user {user}"):
        decode_entry(base["layout"], bytes(rec), user_id=user)  # CRC: every change is caught
    try:
        got = _scores(base["resident"], base["layout"], records, verify_crc=verify)
    except RecordError as exc:
        assert exc.user_id == user and "\n" not in str(exc)
        return
    header_intact = len(rec) == len(base["records"][user]) and rec[:28] == base["records"][user][:28]
    assert header_intact and not verify, "a damaged header or size was served"
    others = [b for b in range(N_USERS) if b != user]  # only the payload of `user` changed
    torch.testing.assert_close(got[others], base["ref"][others], rtol=0, atol=0)


def _with_indices(layout, n: int, k_idx: np.ndarray, v_idx: np.ndarray) -> bytes:
    """A valid record (CRC included) of n behaviours carrying these router indices."""
    return _record(layout, n, k_idx, v_idx)


@settings(max_examples=40, deadline=None)
@given(user=st.integers(0, N_USERS - 1), side=st.sampled_from(["k", "v"]), data=st.data(),
       path=st.sampled_from(["gather", "poolscore"]))
def test_router_index_outside_the_pool(base: dict, user: int, side: str, data: st.DataObject, path: str) -> None:
    """An index >= pool size is a RouterIndexError naming the user from the reader's decode and from the
    serving path (never a raw IndexError, nor an unchecked read on the GPU); the scores of a batch whose
    indices are all inside the pool are unchanged."""
    layout = base["layout"]
    n = data.draw(st.integers(1, SEQ))
    pool = layout.pool_size
    k = np.array(data.draw(st.lists(st.integers(0, pool - 1), min_size=n, max_size=n)))
    v = np.array(data.draw(st.lists(st.integers(0, pool - 1), min_size=n, max_size=n)))
    bad_at = data.draw(st.integers(0, n - 1))
    (k if side == "k" else v)[bad_at] = data.draw(st.integers(pool, 0xFFFF))
    records = list(base["records"])
    records[user] = _with_indices(layout, n, k, v)
    with pytest.raises(RouterIndexError, match=f"user {user}"):
        _scores(base["resident"], layout, records, path)
    with pytest.raises(RouterIndexError, match=f"user {user}: kv.{side}_idx router index .* outside the pool"):
        _batch(layout, records, verify_crc=True)  # the CPU check (reader and verify_crc path)
    (k if side == "k" else v)[bad_at] = pool - 1
    records[user] = _with_indices(layout, n, k, v)
    _scores(base["resident"], layout, records, path)  # in bounds: served


def test_decode_without_flags_raises_naming_the_row(base: dict) -> None:
    layout = base["layout"]
    records = list(base["records"])
    records[2] = _with_indices(layout, 2, np.array([0, layout.pool_size]), np.array([0, 0]))
    dev, _ = to_device(_batch(layout, records), "cpu")
    with torch.inference_mode(), pytest.raises(RouterIndexError, match="batch row 2"):
        decode(base["resident"], _cache(base["resident"], layout, dev), torch.tensor([[1]] * N_USERS), "gather")


@pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
@pytest.mark.parametrize("name", ["collective", "share_k_only", "share_v_only"])
def test_fused_kernel_flags_out_of_pool_indices(name: str) -> None:
    """The fused kernel masks pool loads at out-of-pool indices and sets the user's flag; other users'
    logits equal a clean batch's; without a flag buffer it raises RouterIndexError naming the row."""
    resident, layout = setup(name, "float16")
    resident = type(resident)(resident.model, DEVICE)
    records = random_records(layout, [SEQ, 3, 2, SEQ], np.random.default_rng(1))
    n = 3
    k = np.array([0, 1, layout.pool_size + 5])
    v = np.array([layout.pool_size, 1, 0])
    bad = list(records)
    bad[1] = _record(layout, n, k, v)
    cand = torch.tensor([[1, 2]] * N_USERS, device=DEVICE)
    config = FusedConfig(pool_dtype="float32", block_l=2)
    out = {}
    for label, recs in (("clean", records), ("bad", bad)):
        raw = _batch(layout, recs).tensor.to(DEVICE)
        flags = torch.zeros(N_USERS, dtype=torch.int32, device=DEVICE)
        with torch.inference_mode():
            out[label] = (fused_decode(resident, raw, layout, N_USERS, cand, config=config, flags=flags), flags.cpu())
    assert out["clean"][1].tolist() == [0, 0, 0, 0] and out["bad"][1].tolist() == [0, 1, 0, 0]
    torch.testing.assert_close(out["bad"][0][[0, 2, 3]], out["clean"][0][[0, 2, 3]], rtol=0, atol=0)
    assert torch.isfinite(out["bad"][0]).all()
    raw = _batch(layout, bad).tensor.to(DEVICE)
    with torch.inference_mode(), pytest.raises(RouterIndexError, match="batch row 1"):
        fused_decode(resident, raw, layout, N_USERS, cand, config=config)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runtime_graph_flags_name_the_user_on_cuda(tmp_path) -> None:
    """CUDA graphs (fused and poolscore): the static flag buffer, checked after the replay, names the user."""
    from collectivekv.cachestore.decode.graphs import GraphedDecoder

    resident, layout = setup("collective", "float16")
    resident = type(resident)(resident.model, "cuda")
    records = random_records(layout, [SEQ, 3, 2, SEQ], np.random.default_rng(1))
    records[3] = _with_indices(layout, 2, np.array([0, layout.pool_size]), np.array([0, 0]))
    host = HostBatcher(layout, pin=True).pack(np.arange(N_USERS), records)
    for path in ("fused", "poolscore", "gather"):
        with torch.inference_mode():
            graph = GraphedDecoder(resident, layout, n_users=N_USERS, pad_to=SEQ, n_candidates=1, path=path)
            graph.run(host, np.ones((N_USERS, 1), np.int64))
            torch.cuda.synchronize()
        assert graph.flags.cpu().tolist() == [0, 0, 0, 1], path



def test_zoo_record_index_outside_the_pool_is_refused_on_the_cpu(tmp_path) -> None:
    """Zoo records: every idx part is checked against the pool by the reader and the verify_crc fetch."""
    from collectivekv.cachestore.store.entry import encode_entry, entry_layout
    from collectivekv.cachestore.store.publish import open_current
    from collectivekv.cachestore.store.reader import StoreReader
    from tests.model.zoo_helpers import zoo_config
    from tests.zoo_store_fixtures import publish_records

    layout = entry_layout(zoo_config("eta"), "0123456789abcdef", "collective", "float16")
    parts = [np.zeros((min(3, p.cap), p.width), layout.dtype(p.kind)) for p in layout.parts]
    idx = next(i for i, p in enumerate(layout.parts) if p.kind == "idx")
    good = encode_entry(layout, 3, parts)
    parts[idx][-1] = layout.pool_size  # one past the pool
    root = publish_records(tmp_path, layout, {1: good, 2: encode_entry(layout, 3, parts)})
    with StoreReader(open_current(root)) as reader:
        assert reader.get(1) is not None
        with pytest.raises(RouterIndexError, match=f"user 2: {layout.parts[idx].name} router index"):
            reader.get(2)
        with pytest.raises(RouterIndexError, match="user 2"):
            HostBatcher(layout, reader=reader, pin=False, verify_crc=True).fetch([1, 2])
