"""Per-event behaviour features: what an event adds to its behaviour token besides item, genres and label.

A feature is a small categorical bucket computed from the history itself, so a cached K/V stays valid after
the prefill (never the gap to the request time, which changes after it):

- ``gap``: the time since the same user's previous event, log-bucketed: bucket 0 for a user's first event,
  then ``1 + min(gap_buckets - 2, floor(log2(1 + gap_s) / 2))`` (each bucket spans 4× the gaps of the one
  before: bucket 1 is under 3 s, bucket 8 from 4.5 to 18 h, the last one everything beyond);
- ``hour``: the event's hour of the day, UTC (``floor(t_s / 3600) mod 24``).

The features of an event combine into one **event code** in ``0 .. n_codes - 1`` (mixed radix, features in
``cfg.event_features`` order), and the code rides in the feedback id that every model already embeds:
``feedback = 1 + label + 2 · code`` (0 stays the padding id), so the models, the cache format, the prefill
engines (a token is still ``(item, feedback)``), the store and serving are unchanged; only the feedback
vocabulary grows to ``1 + 2 · n_codes`` (:func:`n_feedback`). Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EVENT_FEATURES: tuple[str, ...] = ("gap", "hour")
HOUR_BUCKETS = 24
TIME_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0,
                                "d": 86400.0}


def check_features(features: Sequence[str], gap_buckets: int, time_unit: str) -> None:
    """ValueError naming the first bad setting."""
    unknown = [f for f in features if f not in EVENT_FEATURES]
    if unknown:
        raise ValueError(f"event feature {unknown[0]!r} is not one of {EVENT_FEATURES}")
    if len(set(features)) != len(features):
        raise ValueError(f"event features repeat: {list(features)}")
    if not 2 <= gap_buckets <= 64:
        raise ValueError(f"gap_buckets must be in [2, 64], got {gap_buckets}")
    if time_unit not in TIME_UNITS:
        raise ValueError(f"event time unit {time_unit!r} is not one of {sorted(TIME_UNITS)}")


def buckets(features: Sequence[str], gap_buckets: int) -> tuple[int, ...]:
    """Buckets of each feature, in order."""
    return tuple(gap_buckets if f == "gap" else HOUR_BUCKETS for f in features)


def n_codes(features: Sequence[str], gap_buckets: int) -> int:
    """Distinct event codes (1 without features)."""
    return int(np.prod(buckets(features, gap_buckets), dtype=np.int64))


def n_feedback(features: Sequence[str], gap_buckets: int) -> int:
    """The feedback vocabulary: padding + (negative, positive) × event codes."""
    return 1 + 2 * n_codes(features, gap_buckets)


def gap_bucket(gap_s: np.ndarray, gap_buckets: int) -> np.ndarray:
    """Bucket 1.. of gaps in seconds (>= 0; see the module docstring)."""
    b = np.floor(np.log2(1.0 + np.maximum(gap_s, 0.0)) / 2.0).astype(np.int64)
    return 1 + np.minimum(b, gap_buckets - 2)


def event_codes(timestamps: np.ndarray, offsets: np.ndarray, features: Sequence[str], gap_buckets: int,
                time_unit: str = "s") -> np.ndarray:
    """(N,) int64 event code of every event of flat histories: ``timestamps`` (N,) in ``time_unit``, row r
    holding ``timestamps[offsets[r]:offsets[r + 1]]`` oldest first. All zeros without features."""
    ts = np.asarray(timestamps, dtype=np.int64)
    code = np.zeros(len(ts), dtype=np.int64)
    if not features or len(ts) == 0:
        return code
    secs = ts.astype(np.float64) * TIME_UNITS[time_unit]  # (N,)
    first = np.zeros(len(ts), dtype=bool)
    starts = np.asarray(offsets[:-1], dtype=np.int64)
    first[starts[starts < len(ts)]] = True  # a row's first event (empty rows start where the next one does)
    for f, nb in zip(features, buckets(features, gap_buckets), strict=True):
        if f == "gap":
            gap = np.diff(secs, prepend=secs[:1])  # (N,) to the previous flat event
            b = np.where(first, 0, gap_bucket(gap, gap_buckets))
        else:
            b = np.floor(secs / 3600.0).astype(np.int64) % HOUR_BUCKETS
        code = code * nb + b
    return code


def feedback_of(labels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The label-and-code class of each event: ``label + 2 · code`` (the window adds 1; 0 is padding)."""
    return np.asarray(labels, dtype=np.int64) + 2 * np.asarray(codes, dtype=np.int64)


@dataclass(frozen=True)
class EventSpec:
    """A model's per-event features (``ModelConfig.event_features``, ``gap_buckets``, ``event_time_unit``)."""

    features: tuple[str, ...] = ()
    gap_buckets: int = 16
    time_unit: str = "s"

    @classmethod
    def of(cls, cfg: object) -> EventSpec:
        """The spec of a :class:`model.config.ModelConfig` (any object with its three fields)."""
        return cls(tuple(getattr(cfg, "event_features", ())), getattr(cfg, "gap_buckets", 16),
                   getattr(cfg, "event_time_unit", "s"))

    @property
    def n_feedback(self) -> int:
        return n_feedback(self.features, self.gap_buckets)

    def classes(self, labels: np.ndarray, timestamps: np.ndarray | None, offsets: np.ndarray,
                where: str = "histories") -> np.ndarray:
        """(N,) ``label + 2 · code`` of flat histories (``offsets``: row boundaries); ``labels`` unchanged without
        features. ValueError when the features need timestamps that ``where`` lacks."""
        if not self.features:
            return np.asarray(labels, dtype=np.int64)
        if timestamps is None:
            raise ValueError(f"{where}: the model uses per-event features {list(self.features)}, which need the "
                             "histories' 'timestamps' column")
        return feedback_of(labels, event_codes(timestamps, offsets, self.features, self.gap_buckets, self.time_unit))
