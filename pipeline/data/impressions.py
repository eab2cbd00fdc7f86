"""Impression logs → events: ``ckv data prepare --impressions FILE [--history FILE]``.

News and feed datasets publish what a user was shown rather than a list of interactions:

    impressions  one row per impression: <user>, <time>, <shown> (the item ids shown) and <clicked> (the
                 ids clicked), each a list: a Parquet list column, or text with the ids separated by
                 ``list_sep`` (default a space: "N1 N7 N9"). With ``labelled`` the shown list carries the
                 labels itself, as MIND's "N1-0 N7-1 N9-0" (item id, '-', 0 or 1) and there is no clicked
                 column.
    history      (optional) the items each user read before the log starts: one row per read or per user,
                 <user>, <item> (one id or a list) and an optional <time>.

Events: every shown item that was not clicked → label 0; every clicked item → label 1 (also when the shown
list lacks it); an item twice in one impression is one event (clicked if either was). An impression's
events carry its time, in the order shown, then clicked ids not shown. History reads → label 1, at their
time, or, without a time column, one unit before the earliest impression (so they are in every user's past
and in the train split), each (user, item) read once. Ids and times are keyed / converted as in an events
file (pipeline/data/event_values.py), over both files together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from collectivekv.cachestore.store.data_error import DataError
from collectivekv.pipeline.data.event_formats import SEP_NAMES, first_bad, is_list_cell, read_frame
from collectivekv.pipeline.data.event_values import EventLog, KeyedIds, key_ids, looks_textual, merge_names, to_times
from collectivekv.pipeline.data.events import _where, check_no_nulls


@dataclass(frozen=True)
class ImpressionOptions:
    """Column names and value formats of an impression log (+ read history). ``history_user_col`` /
    ``history_item_col`` default to ``user_col`` / ``item_col``."""

    user_col: str = "user"
    time_col: str = "time"
    shown_col: str = "shown"
    clicked_col: str = "clicked"
    labelled: bool = False
    list_sep: str = " "
    item_col: str = "item"
    history_user_col: str | None = None
    history_item_col: str | None = None
    history_time_col: str | None = None
    sep: str | None = None
    user_ids: str = "auto"
    item_ids: str = "auto"
    time_unit: str = "s"
    time_format: str | None = None

    @property
    def label_rule(self) -> str:
        if self.labelled:
            rule = f"label = the 0/1 suffix of each 'item-label' in column '{self.shown_col}'"
        else:
            rule = f"label = 1 if in column '{self.clicked_col}', 0 if only in column '{self.shown_col}'"
        return f"{rule} (impressions); history reads: 1"


def split_lists(cells: pd.Series, list_sep: str) -> pd.Series:
    """One element per row of the result, indexed by the cell's row (an exploded column), in list order.
    Cells: a list (Parquet), text split on ``list_sep`` (empty tokens dropped), a single value, or null (no
    elements)."""
    list_sep = SEP_NAMES.get(list_sep.lower(), list_sep)
    sep = None if list_sep == " " else list_sep  # a space also takes runs of spaces and tabs

    def elements(cell: object) -> list:
        if cell is None or (isinstance(cell, float) and np.isnan(cell)):
            return []
        if is_list_cell(cell):
            return [v for v in list(cell) if v is not None]  # type: ignore[arg-type]
        if isinstance(cell, str):
            return [t.strip() for t in cell.split(sep) if t.strip()]
        return [cell]

    lists = cells.map(elements)
    out = lists.explode()
    return out[out.notna()]


def parse_labelled(tokens: pd.Series, where: str) -> tuple[pd.Series, np.ndarray]:
    """'item-label' tokens → (item ids, labels int8); DataError naming the first token without a 0/1 suffix."""
    text = tokens.astype(str)
    parts = text.str.rsplit("-", n=1)
    item, label = parts.str[0], parts.str[1]
    bad = (parts.str.len() != 2) | ~label.isin(("0", "1")) | (item.str.len() == 0)
    bad = bad.fillna(True).to_numpy(bool)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} impression token(s) not of the form <item>-<0|1> "
                        f"(e.g. N123-1), {first_bad(bad, tokens)}")
    return item, label.astype(np.int8).to_numpy()


def _mode(mode: str, *columns: pd.Series) -> str:
    if mode != "auto":
        return mode
    return "string" if any(looks_textual(c.astype(object)) for c in columns if len(c)) else "int"


def _read_impressions(impressions: str | Path, opts: ImpressionOptions) -> tuple[pd.DataFrame, np.ndarray, str, list]:
    """The impression file: its frame, times (and their input kind), and the (items, labels, part) lists."""
    imp_cols = {"user": opts.user_col, "timestamp": opts.time_col, "shown": opts.shown_col}
    if not opts.labelled:
        imp_cols["clicked"] = opts.clicked_col
    # auto: read as text, so both files key one user alike ("0042" of one file and "U9" of the other: text ids)
    text = ["shown", "clicked"] + (["user"] if opts.user_ids in ("string", "auto") else [])
    imp = read_frame(impressions, imp_cols, "impressions", sep=opts.sep, text=text)
    check_no_nulls(imp["user"], _where(impressions, "impressions", opts.user_col, "user id"))
    times, kind = to_times(imp["timestamp"], _where(impressions, "impressions", opts.time_col, "time"),
                           opts.time_unit, opts.time_format)
    shown = split_lists(imp["shown"], opts.list_sep)
    if opts.labelled:
        where = _where(impressions, "impressions", opts.shown_col, "shown item-label")
        shown_items, shown_labels = parse_labelled(shown, where)
        return imp, times, kind, [(shown_items, shown_labels, 0)]
    clicked = split_lists(imp["clicked"], opts.list_sep)
    return imp, times, kind, [(shown, np.zeros(len(shown), np.int8), 0), (clicked, np.ones(len(clicked), np.int8), 1)]


def _read_history(history: str | Path, opts: ImpressionOptions) -> tuple[pd.DataFrame, pd.Series]:
    """The read-history file: its frame and its item lists."""
    h_cols = {"user": opts.history_user_col or opts.user_col, "item": opts.history_item_col or opts.item_col}
    if opts.history_time_col:
        h_cols["timestamp"] = opts.history_time_col
    text = ["item"] + (["user"] if opts.user_ids in ("string", "auto") else [])
    hist = read_frame(history, h_cols, "history", sep=opts.sep, text=text)
    check_no_nulls(hist["user"], _where(history, "history", h_cols["user"], "user id"))
    return hist, split_lists(hist["item"], opts.list_sep)


def _impression_events(impressions: str | Path, opts: ImpressionOptions, parts: list, users: KeyedIds,
                       times: np.ndarray, item_mode: str) -> tuple[pd.DataFrame, list[KeyedIds]]:
    """One event per (impression, item): clicked → 1, shown only → 0 (first position kept)."""
    keyed_items: list[KeyedIds] = []
    frames = []
    for (items, labels, part), col in zip(parts, (opts.shown_col, opts.clicked_col), strict=False):
        k = key_ids(items, item_mode, _where(impressions, "impressions", col, "item ids in lists"), "--item-ids")
        keyed_items.append(k)
        rows = items.index.to_numpy(np.int64)
        frames.append(pd.DataFrame({"row": rows, "part": part, "pos": np.arange(len(rows)), "item": k.keys,
                                    "label": labels}))
    ev = pd.concat(frames, ignore_index=True)
    ev = ev.iloc[np.lexsort((ev["pos"].to_numpy(), ev["part"].to_numpy(), ev["row"].to_numpy()))]
    ev["label"] = ev.groupby(["row", "item"], sort=False)["label"].transform("max")
    ev = ev.drop_duplicates(["row", "item"], keep="first")
    rows = ev["row"].to_numpy(np.int64)
    return pd.DataFrame({"user": users.keys[rows], "item": ev["item"].to_numpy(np.int64),
                         "timestamp": times[rows], "label": ev["label"].to_numpy(np.int8)}), keyed_items


def _history_events(history: str | Path, opts: ImpressionOptions, hist: pd.DataFrame, h_items: pd.Series,
                    modes: tuple[str, str], times: np.ndarray, kind: str, time: dict[str, Any]
                    ) -> tuple[pd.DataFrame, KeyedIds, KeyedIds]:
    """One positive event per read; times from the history's column, else one unit before the earliest
    impression (recorded in ``time["history"]``)."""
    h_user_col, h_item_col = opts.history_user_col or opts.user_col, opts.history_item_col or opts.item_col
    h_users = key_ids(hist["user"], modes[0], _where(history, "history", h_user_col, "user id"), "--user-ids")
    h_keys = key_ids(h_items, modes[1], _where(history, "history", h_item_col, "item ids"), "--item-ids")
    h_rows = h_items.index.to_numpy(np.int64)
    if opts.history_time_col:
        h_where = _where(history, "history", opts.history_time_col, "time")
        h_times, h_kind = to_times(hist["timestamp"], h_where, opts.time_unit, opts.time_format)
        if (h_kind == "number") != (kind == "number"):
            raise DataError(f"{h_where}: times are {h_kind}, the impressions' are {kind}: give both as numbers "
                            "or both as dates / times")
        h_ts = h_times[h_rows]
        time["history"] = {"column": opts.history_time_col, "input": h_kind}
    else:
        h_ts = np.full(len(h_rows), int(times.min()) - 1, np.int64)
        time["history"] = "one unit before the earliest impression"
    reads = pd.DataFrame({"user": h_users.keys[h_rows], "item": h_keys.keys, "timestamp": h_ts,
                          "label": np.ones(len(h_rows), np.int8), "history_only": True})
    if not opts.history_time_col:
        reads = reads.drop_duplicates(["user", "item"], keep="first")
    return reads, h_users, h_keys


def read_impression_log(impressions: str | Path, history: str | Path | None, opts: ImpressionOptions) -> EventLog:
    """Read an impression log (+ read history) into events (module docstring)."""
    imp, times, kind, parts = _read_impressions(impressions, opts)
    hist, h_items = _read_history(history, opts) if history is not None else (None, None)
    # one key scheme for users / items across both files
    user_mode = _mode(opts.user_ids, imp["user"], *([hist["user"]] if hist is not None else []))
    item_mode = _mode(opts.item_ids, *[p[0] for p in parts], *([h_items] if h_items is not None else []))
    users = key_ids(imp["user"], user_mode, _where(impressions, "impressions", opts.user_col, "user id"), "--user-ids")
    imp_events, keyed_items = _impression_events(impressions, opts, parts, users, times, item_mode)
    time = {"column": opts.time_col, "input": kind, "unit": opts.time_unit,
            **({"format": opts.time_format} if opts.time_format else {})}
    keyed_users, out = [users], [imp_events]
    if hist is not None and history is not None and h_items is not None:
        reads, h_users, h_keys = _history_events(history, opts, hist, h_items, (user_mode, item_mode), times, kind,
                                                 time)
        keyed_users.append(h_users)
        keyed_items.append(h_keys)
        out.insert(0, reads)
    events = pd.concat(out, ignore_index=True)
    if "history_only" in events.columns:  # the reads (the impressions: not)
        events["history_only"] = events["history_only"].eq(True).to_numpy(bool)
    if len(events) == 0:
        raise DataError(f"impressions file {impressions}: no shown, clicked or read items (column "
                        f"'{opts.shown_col}'{'' if opts.labelled else f', {opts.clicked_col!r}'} empty)")
    merge_names(keyed_users, f"impressions file {impressions} and history file {history}: user ids")
    names = merge_names(keyed_items, f"impressions file {impressions}: item ids")
    return EventLog(events, users.scheme, keyed_items[0].scheme, names, time)
