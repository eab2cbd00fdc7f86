"""Per-event features (model/events.py): the bucket arithmetic by hand, causality (a cached event's code never
changes when later events arrive), the config round trip that keeps old model versions, and the feedback
vocabulary the models embed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa  # noqa: E402  (after the project's imports: the order the other tests use)
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectivekv.model.cache_spec import token_vocabulary
from collectivekv.model.config import ModelConfig, config_from_dict, config_to_dict
from collectivekv.model.events import EventSpec, event_codes, gap_bucket, n_codes, n_feedback
from collectivekv.model.zoo import create_model
from collectivekv.pipeline.data.history import HistoryIndex, arrow_window

H = 3600


def test_codes_by_hand() -> None:
    # user A: 00:10, +2 s, +1 h (01:10:02), +3 days; user B: empty; user C: one event at 23:59
    ts = np.array([600, 602, 602 + H, 602 + H + 3 * 86400, 23 * H + 3540])
    offsets = np.array([0, 4, 4, 5])
    gap = event_codes(ts, offsets, ("gap",), 16)
    assert gap.tolist() == [0, 1 + 0, 1 + 5, 1 + 8, 0]  # log2(1 + gap) / 2: 0.79, 5.9, 8.99
    hour = event_codes(ts, offsets, ("hour",), 16)
    assert hour.tolist() == [0, 0, 1, 1, 23]
    both = event_codes(ts, offsets, ("gap", "hour"), 16)
    assert both.tolist() == [g * 24 + h for g, h in zip(gap.tolist(), hour.tolist(), strict=True)]
    assert event_codes(ts * 1000, offsets, ("gap", "hour"), 16, "ms").tolist() == both.tolist()
    assert event_codes(ts, offsets, (), 16).tolist() == [0] * 5
    assert gap_bucket(np.array([0.0, 1e12]), 4).tolist() == [1, 3]  # capped at the last bucket
    assert n_codes(("gap", "hour"), 16) == 384 and n_feedback(("gap", "hour"), 16) == 769 and n_feedback((), 16) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 10**6), max_size=12), min_size=1, max_size=6), st.integers(2, 20))
def test_codes_are_causal_and_in_range(gaps: list[list[int]], buckets: int) -> None:
    rows = [np.cumsum(g) + 1_700_000_000 for g in gaps]
    flat = np.concatenate(rows) if any(len(r) for r in rows) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    codes = event_codes(flat, offsets, ("gap", "hour"), buckets)
    assert ((codes >= 0) & (codes < n_codes(("gap", "hour"), buckets))).all()
    for r, row in enumerate(rows):  # each user's codes are those of every prefix of the user's history
        own = codes[offsets[r] : offsets[r + 1]]
        for k in range(len(row)):
            assert event_codes(row[: k + 1], np.array([0, k + 1]), ("gap", "hour"), buckets)[-1] == own[k]
    g = np.sort(np.concatenate([np.asarray(x, float) for x in gaps] + [np.zeros(1)]))
    assert (np.diff(gap_bucket(g, buckets)) >= 0).all()  # longer gaps never get a lower bucket


def test_config_round_trip_keeps_old_versions() -> None:
    plain = ModelConfig(n_items=10)
    assert "event_features" not in config_to_dict(plain) and "gap_buckets" not in config_to_dict(plain)
    cfg = ModelConfig(n_items=10, event_features=["hour", "gap"], gap_buckets=8, event_time_unit="ms")
    assert cfg.event_features == ("hour", "gap") and cfg.n_feedback == 1 + 2 * 24 * 8
    d = config_to_dict(cfg)
    assert d["event_features"] == ["hour", "gap"] and config_from_dict(d) == cfg
    for bad, match in (({"event_features": ("weekday",)}, "not one of"), ({"event_features": ("gap", "gap")}, "repeat"),
                       ({"gap_buckets": 1}, "gap_buckets"), ({"event_time_unit": "fortnight"}, "time unit")):
        with pytest.raises(ValueError, match=match):
            ModelConfig(n_items=10, **bad)  # type: ignore[arg-type]
    assert token_vocabulary(cfg) == 10 * 2 * 24 * 8 and token_vocabulary(plain) == 20


@pytest.mark.parametrize("arch", ["din", "sim", "hstu"])
def test_models_embed_every_event_code_and_decode_their_prefill(arch: str) -> None:
    cfg = ModelConfig(n_items=30, embed_dim=8, d_attn=16, n_heads=2, max_len=12, long_len=12, topk=4, mlp_dims=(8,),
                      arch=arch, event_features=("gap", "hour"), gap_buckets=4)  # type: ignore[arg-type]
    model = create_model(cfg).eval()
    assert model.feedback_emb.num_embeddings == cfg.n_feedback == 193
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, 31, (3, 12), generator=g)
    feedback = torch.randint(1, cfg.n_feedback, (3, 12), generator=g)
    lengths = torch.tensor([12, 5, 0])
    valid = torch.arange(12)[None, :] < lengths[:, None]
    items, feedback = items * valid, feedback * valid
    target = torch.randint(1, 31, (3,), generator=g)
    with torch.no_grad():
        ref = model(items, feedback, lengths, target)[0]
        got = model.decode(model.prefill(items, feedback, lengths), target)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_history_index_and_arrow_window_fold_the_codes() -> None:
    hist = pa.table({"user_id": pa.array([5, 3], pa.int64()),
                     "items": pa.array([[1, 2, 3], [4]], pa.list_(pa.int32())),
                     "timestamps": pa.array([[0, 10, 10 + H], [7 * H]], pa.list_(pa.int64())),
                     "labels": pa.array([[1, 0, 1], [0]], pa.list_(pa.int8()))})  # fmt: skip
    spec = EventSpec(("gap", "hour"), 4)
    w = HistoryIndex(hist, spec).window(np.array([5, 3]), None, 2)
    codes = event_codes(np.array([0, 10, 10 + H]), np.array([0, 3]), spec.features, 4)
    assert w.feedback[0].tolist() == [1 + 0 + 2 * int(codes[1]), 1 + 1 + 2 * int(codes[2])]  # window of 2 of 3
    assert w.feedback[1].tolist() == [1 + 0 + 2 * 7, 0]  # first event: gap bucket 0, hour 7
    a = arrow_window(hist.column("items").combine_chunks(), hist.column("labels").combine_chunks(), 2,
                     hist.column("timestamps").combine_chunks(), spec)
    assert a.feedback.tolist() == w.feedback[[0, 1]].tolist()
    assert HistoryIndex(hist).window(np.array([5]), None, 2).feedback.tolist() == [[1, 2]]  # no features: labels
    with pytest.raises(ValueError, match="need the histories' 'timestamps'"):
        HistoryIndex(hist.drop(["timestamps"]), spec)
