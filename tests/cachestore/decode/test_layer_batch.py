"""HSTU batches split by layer (cachestore/decode/layer_batch.py): the layouts that split, the two buffers' bytes and
headers (every record reassembles to the store's bytes, any mix of lengths and cold starts), the HostBatcher's errors
naming the user, the ring's staleness, and the decode of a split batch — equal to the one-buffer batch's, eagerly
(Triton's interpreter on CPU) and (CUDA) in captured graphs copying it in pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.batch import HostBatcher
from collectivekv.cachestore.decode.fused import fused_available
from collectivekv.cachestore.decode.graphs import GraphedDecoder
from collectivekv.cachestore.decode.layer_batch import REST_PAD, LayerBatch, LayerBatcher, split_layouts
from collectivekv.cachestore.decode.transfer import to_device
from collectivekv.cachestore.store.entry import entry_layout
from collectivekv.cachestore.store.record import HEADER_SIZE, RecordError, RecordSizeError
from tests.cachestore.decode.test_fused_hstu import VERSION, make_case
from tests.model.zoo_helpers import N_ITEMS, zoo_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE = make_case("collective", 2, "collective", "float16")  # lengths 0, 1, 4, the window, longer, a cold start


def test_split_layouts_of_each_layout() -> None:
    """HSTU of 2 layers: its first layer's parts, then the second's; one layer, SIM (retrieval keys): no split."""
    first, rest = split_layouts(CASE.layout)
    assert [p.name for p in first.parts + rest.parts] == [p.name for p in CASE.layout.parts]
    assert {p.name.split(".")[0] for p in first.parts} == {"layer0"} and rest.groups[0].name == "layer1"
    assert first.record_size(7) + rest.record_size(7) - HEADER_SIZE == CASE.layout.record_size(7)
    one = entry_layout(zoo_config("hstu", hstu_layers=1), VERSION, "collective", "float16")
    assert split_layouts(one) is None and split_layouts(entry_layout(zoo_config("sim"), VERSION, "collective",
                                                                     "float16")) is None
    twin = entry_layout(zoo_config("twin", max_len=10, long_len=10), VERSION, "collective", "float16")
    assert split_layouts(twin) is None  # two groups of max_len rows, no keys: still not an HSTU record
    with pytest.raises(ValueError, match="do not split by layer"):
        LayerBatcher(one, pin=False)


def _check_split(batch: LayerBatch, records: list) -> None:
    """Every record reassembles; header words: offsets, lengths, rest offsets, lengths; each user's first buffer holds
    its header and first layer, its second the later layers at rest offset + 32; cold users read nothing."""
    first, rest = split_layouts(batch.layout)
    n = batch.n_users
    words = batch.tensor.numpy()[: 32 * n].view(np.int64)
    np.testing.assert_array_equal(words[n : 2 * n], words[3 * n :])  # lengths twice
    assert batch.zero_offset == 32 * n and batch.tensor.numpy()[32 * n : 32 * n + 8].tobytes() == bytes(8)
    a_bytes, b_bytes = batch.tensor.numpy().tobytes(), batch.rest_tensor.numpy().tobytes()
    for b, record in enumerate(records):
        m = int(words[n + b])
        if record is None:
            assert batch.record(b) is None and m == 0 and words[b] == batch.zero_offset and words[2 * n + b] == 0
            continue
        record = bytes(record)
        head = first.record_size(m)
        assert batch.record(b) == record
        assert a_bytes[words[b] : words[b] + head] == record[:head]
        at = int(words[2 * n + b]) + HEADER_SIZE
        assert b_bytes[at : at + rest.record_size(m) - HEADER_SIZE] == record[head:]
    assert batch.rest_tensor.numpy()[:REST_PAD].tobytes() == bytes(REST_PAD)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=9))
def test_any_mix_of_users_splits_and_reassembles(picks: list[int]) -> None:
    """Any order of the case's users (repeats, cold starts) packs into two buffers that reassemble to the records."""
    records = [CASE.records[i] for i in picks]
    batch = LayerBatcher(CASE.layout, pin=False).pack(list(range(len(picks))), records)
    _check_split(batch, records)
    np.testing.assert_array_equal(batch.lengths, HostBatcher(CASE.layout, pin=False).pack(
        list(range(len(picks))), records).lengths)


def test_bad_records_are_refused_naming_the_user_and_stale_batches_raise() -> None:
    """A record of another size, one with a broken header and one longer than any the layout allows raise the
    HostBatcher's errors naming the user; the eager path refuses a split batch; a batch whose ring buffer a later pack
    reused raises."""
    good = bytes(CASE.records[3])
    for bad in (good[:-2], b"\x00" * 4 + good[4:]):
        with pytest.raises(RecordError) as split_error:
            LayerBatcher(CASE.layout, pin=False).pack([7, 8], [CASE.records[1], bad])
        with pytest.raises(RecordError) as one_error:
            HostBatcher(CASE.layout, pin=False).pack([7, 8], [CASE.records[1], bad])
        assert type(split_error.value) is type(one_error.value) and split_error.value.user_id == 8
    with pytest.raises(RecordSizeError) as too_long:
        LayerBatcher(CASE.layout, pin=False).pack([7, 8], [CASE.records[1], good + bytes(CASE.layout.record_size(
            CASE.layout.max_len))])
    assert too_long.value.user_id == 8
    batcher = LayerBatcher(CASE.layout, pin=False, n_buffers=1)
    with pytest.raises(ValueError, match="HSTU's CUDA graphs only"):
        to_device(batcher.pack([0], [CASE.records[1]]), "cpu")
    old = batcher.pack([0], [CASE.records[1]])
    batcher.pack([0], [CASE.records[2]])
    with pytest.raises(RuntimeError, match="stale"):
        old.record(0)


@pytest.mark.skipif(not fused_available(DEVICE), reason="needs Triton (CUDA, or its CPU interpreter)")
def test_split_batch_decodes_as_the_one_buffer_batch() -> None:
    """GraphedDecoder (eager on CPU: the fused kernels interpreted; graphs on CUDA, pieces as configured) scores a
    split batch as the one-buffer batch of the same records, over successive batches; a batch of other users refused."""
    eager = DEVICE != "cuda"
    graph = GraphedDecoder(CASE.resident, CASE.layout, n_users=6, pad_to=CASE.layout.max_len, eager=eager,
                           path="fused")
    split = LayerBatcher(CASE.layout, pin=not eager, n_buffers=1)
    whole = HostBatcher(CASE.layout, pin=not eager, n_buffers=1)
    rng = np.random.default_rng(0)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]):
        records = [CASE.records[i] for i in order]
        cand = torch.from_numpy(rng.integers(1, N_ITEMS + 1, (6, 1)))
        want = graph.run(whole.pack(order, records), cand).clone()  # each kind after the other on one decoder
        batch = split.pack(order, records)
        got = graph.run(batch, cand).clone()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        copied = graph.split_copy_bytes(batch)  # each buffer's copy-size bucket: at least the batch's bytes
        assert copied[0] >= batch.used_bytes and copied[1] >= batch.rest_bytes
        assert graph.copy_bytes(batch) == (batch.used_bytes + batch.rest_bytes if eager else sum(copied))
    with pytest.raises(ValueError, match="users"):
        graph.run(split.pack([0, 1], CASE.records[:2]), torch.ones(2, 1, dtype=torch.int64))
