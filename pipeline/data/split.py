"""Which split (train / valid / test) each event's sample goes to: `ckv data prepare --split`.

- ``global`` (the default): one time cut for every user (:func:`pipeline.data.build.split_boundaries`):
  train ts < valid_start <= valid ts < test_start <= test ts. Only users active after the cut have
  test samples (82 of 671 on the bundled MovieLens).
- ``per-user``: leave-last-k-out. Each user's events in history order (stable sort by timestamp, ties
  in input row order): the last ``test_events`` are test, the ``valid_events`` before them valid, the
  rest train. Users with fewer than ``valid_events + test_events + 1`` events keep every event in train,
  so every user that has test samples also has at least one training event.

Leakage rule, both kinds: a sample's history is the user's events with a timestamp strictly before the
sample's (``hist_len``), so no history holds the sample itself, anything at its timestamp or later; a
training sample's history therefore never holds one of its user's valid or test events (they come
later in that user's order), and valid/test events are never training samples. Histories of valid and
test samples hold the user's earlier events of every split, as in a deployed system. The per-user
split is not a time split *across* users: one user's training events may be later than another user's
test events (the usual property of leave-last-out evaluation); the global split has no such overlap.

- ``source``: the split an imported dataset's source files give (``ckv data import``:
  pipeline/data/fuxictr_import.py): each sample stays in its file's split; no time rule across splits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SPLIT_KINDS: tuple[str, str] = ("global", "per-user")  # what `ckv data prepare --split` makes
SOURCE_SPLIT = "source"  # the source's own train / valid / test files (`ckv data import`)
DATASET_SPLIT_KINDS: tuple[str, ...] = (*SPLIT_KINDS, SOURCE_SPLIT)  # what a dataset's meta.json may record
TRAIN, VALID, TEST = 0, 1, 2


def global_assignment(ts: np.ndarray, valid_start: int, test_start: int) -> np.ndarray:
    """(n,) int8 split code per event of the global time cut (ties at a boundary go to the later split)."""
    return ((ts >= valid_start).astype(np.int8) + (ts >= test_start).astype(np.int8)).astype(np.int8)


def per_user_assignment(order: np.ndarray, user_sorted: np.ndarray, valid_events: int, test_events: int
                        ) -> np.ndarray:
    """(n,) int8 split code per event of leave-last-k-out.

    ``order``: the events' history order (stable by user, then timestamp, then input row) and
    ``user_sorted = user[order]``; the last ``test_events`` of each user are TEST, the ``valid_events``
    before them VALID, the rest TRAIN; a user with fewer than ``valid_events + test_events + 1`` events
    is all TRAIN."""
    n = len(order)
    new_user = np.concatenate([[True], user_sorted[1:] != user_sorted[:-1]])
    starts = np.flatnonzero(new_user)
    sizes = np.diff(np.concatenate([starts, [n]]))
    size = np.repeat(sizes, sizes)  # (n,) events of the row's user
    from_end = size - 1 - (np.arange(n) - np.repeat(starts, sizes))  # 0 = the user's last event
    eligible = size >= valid_events + test_events + 1
    code = np.where(eligible & (from_end < test_events), TEST,
                    np.where(eligible & (from_end < test_events + valid_events), VALID, TRAIN))
    out = np.empty(n, np.int8)
    out[order] = code
    return out


def per_user_meta(valid_events: int, test_events: int) -> dict[str, Any]:
    """``meta["splits"]`` of a per-user split."""
    return {"kind": "per-user", "valid_events": valid_events, "test_events": test_events,
            "min_events": valid_events + test_events + 1}


def split_kind(meta: dict[str, Any]) -> str:
    """"global", "per-user" or "source" (a dataset written before the split kind was recorded is global)."""
    return str(meta.get("splits", {}).get("kind", "global"))


def check_per_user(users: np.ndarray, offsets: np.ndarray, split_users: dict[str, np.ndarray],
                   split_ts: dict[str, np.ndarray], splits: dict[str, Any]) -> str | None:
    """What breaks a per-user split, or None: every user with ``min_events`` events has exactly
    ``test_events`` test and ``valid_events`` valid samples, any other user none, and per user
    train ts <= valid ts <= test ts. ``users``/``offsets``: the histories' sorted user ids and list
    offsets; ``split_users``/``split_ts``: each split's sample user ids and timestamps."""
    n_events = np.diff(offsets)
    eligible = n_events >= splits["min_events"]
    for split, want in (("valid", splits["valid_events"]), ("test", splits["test_events"])):
        got = np.bincount(np.searchsorted(users, split_users[split]), minlength=len(users))
        if not np.array_equal(got, np.where(eligible, want, 0)):
            return f"{split} samples per user differ from {want} per user with >= {splits['min_events']} events"
    for early, late in (("train", "valid"), ("valid", "test")):
        last = np.full(len(users), np.iinfo(np.int64).min)
        np.maximum.at(last, np.searchsorted(users, split_users[early]), split_ts[early])
        first = np.full(len(users), np.iinfo(np.int64).max)
        np.minimum.at(first, np.searchsorted(users, split_users[late]), split_ts[late])
        if np.any(last > first):
            return f"a user's {early} sample is later than one of their {late} samples"
    return None
