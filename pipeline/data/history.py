"""Behaviour histories as flat arrays + offsets, and the model's fixed-length window over them.

The one place that turns jagged histories into the model's padded input (used by training,
evaluation, the Spark prefill and serving):

    items (B, L) int64   the last ``min(n, L)`` behaviours before the cut, oldest first, then 0s
    feedback (B, L)      1 + label of each behaviour (1 negative, 2 positive), 0 at padding; with per-event
                         features (``events``: :class:`model.events.EventSpec`) 1 + label + 2 · event code,
                         the code computed over the whole history (a gap looks back past the window's start)
    lengths (B,)         valid behaviours per row
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from collectivekv.model.events import EventSpec


@dataclass(frozen=True)
class Window:
    """Padded model input for a batch of histories (numpy; see module docstring)."""

    items: np.ndarray
    feedback: np.ndarray
    lengths: np.ndarray


def last_window(
    flat_items: np.ndarray, flat_labels: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int
) -> Window:
    """The last ``max_len`` behaviours of each slice ``[starts[b], ends[b])`` of the flat arrays.

    flat_items: (N,) int item ids; flat_labels: (N,) 0/1; starts, ends: (B,) int64 offsets.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    first = np.maximum(starts, ends - max_len)  # (B,)
    lengths = ends - first  # (B,)
    pos = np.arange(max_len, dtype=np.int64)  # (L,)
    valid = pos[None, :] < lengths[:, None]  # (B, L)
    gather = np.where(valid, first[:, None] + pos[None, :], 0)  # (B, L)
    if len(flat_items) == 0:
        gather[:] = 0
        flat_items = np.zeros(1, dtype=np.int64)
        flat_labels = np.zeros(1, dtype=np.int64)
    items = np.where(valid, flat_items[gather], 0).astype(np.int64)  # (B, L)
    feedback = np.where(valid, flat_labels[gather].astype(np.int64) + 1, 0)  # (B, L)
    return Window(items=items, feedback=feedback, lengths=lengths)


def arrow_window(items: pa.Array, labels: pa.Array, max_len: int, timestamps: pa.Array | None = None,
                 events: EventSpec | None = None) -> Window:
    """``last_window`` over whole Arrow list arrays (one history per row, e.g. a Spark batch); ``timestamps``
    (list<int64>) are read when ``events`` has features."""
    offsets = np.asarray(items.offsets, dtype=np.int64)
    flat_items = np.asarray(items.values, dtype=np.int64)
    flat_labels = np.asarray(labels.values, dtype=np.int64)
    if not np.array_equal(offsets, np.asarray(labels.offsets, dtype=np.int64)):
        raise ValueError("history columns 'items' and 'labels' have different lengths in some row")
    if events is not None and events.features:
        flat_ts = None
        if timestamps is not None:
            if not np.array_equal(offsets, np.asarray(timestamps.offsets, dtype=np.int64)):
                raise ValueError("history columns 'items' and 'timestamps' have different lengths in some row")
            flat_ts = np.asarray(timestamps.values, dtype=np.int64)
        flat_labels = events.classes(flat_labels, flat_ts, offsets)
    return last_window(flat_items, flat_labels, offsets[:-1], offsets[1:], max_len)


class HistoryIndex:
    """All users' histories in memory: sorted user ids, offsets and flat item/label arrays."""

    def __init__(self, histories: pa.Table, events: EventSpec | None = None) -> None:
        """``events``: the model's per-event features, folded into the labels (module docstring)."""
        users = histories.column("user_id").to_numpy()
        if len(users) > 1 and not np.all(users[1:] > users[:-1]):
            order = np.argsort(users, kind="stable")
            histories = histories.take(order)
            users = users[order]
        items = histories.column("items").combine_chunks()
        labels = histories.column("labels").combine_chunks()
        self.users = users.astype(np.int64)
        self.offsets = np.asarray(items.offsets, dtype=np.int64)
        self.items = np.asarray(items.values, dtype=np.int64)
        self.labels = np.asarray(labels.values, dtype=np.int64)
        if events is not None and events.features:
            ts = None
            if "timestamps" in histories.column_names:
                ts = np.asarray(histories.column("timestamps").combine_chunks().values, dtype=np.int64)
            self.labels = events.classes(self.labels, ts, self.offsets)

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Row of each user id; KeyError naming the first unknown user."""
        rows = np.searchsorted(self.users, user_ids)
        rows_c = np.minimum(rows, len(self.users) - 1)
        bad = (rows >= len(self.users)) | (self.users[rows_c] != user_ids)
        if bad.any():
            raise KeyError(f"user {int(np.asarray(user_ids)[bad][0])} has no history")
        return rows

    def window(self, user_ids: np.ndarray, hist_lens: np.ndarray | None, max_len: int) -> Window:
        """Window over each user's first ``hist_lens`` events (all events if None)."""
        rows = self.rows(np.asarray(user_ids, dtype=np.int64))
        starts = self.offsets[rows]
        full = self.offsets[rows + 1] - starts
        n = full if hist_lens is None else np.asarray(hist_lens, dtype=np.int64)
        if np.any(n > full) or np.any(n < 0):
            raise ValueError("hist_len exceeds the user's history length")
        return last_window(self.items, self.labels, starts, starts + n, max_len)
