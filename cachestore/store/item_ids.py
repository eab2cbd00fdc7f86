"""Raw item ids ↔ the model's dense item ids, at the array level (numpy only, no torch).

The model's item embedding rows are indexed by dense ids 1..n (0 = padding); requests name items
by their raw ids (the ids of the event log). The mapping itself is the item catalogue
(``cachestore/store/catalogue.py``, persisted with every dataset and checkpoint); serving only needs the
lookup, so it lives here and the catalogue and :class:`cachestore.decode.runtime.DecodeRuntime` share it.

:class:`ItemIds` holds the raw ids sorted (``sorted_raw``, strictly increasing int64) and the dense
id of each (``dense``, aligned with ``sorted_raw``); :func:`raw_to_dense` is one ``searchsorted``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNKNOWN = 0  # dense id given to an unknown raw id by raw_to_dense (the padding row: never a real item)


class UnknownItemError(ValueError):
    """A raw item id that is not in the catalogue; ``position`` is its flat index in the query."""

    def __init__(self, raw: int, position: int, message: str) -> None:
        super().__init__(message)
        self.raw, self.position = raw, position


def raw_to_dense(sorted_raw: np.ndarray, dense: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dense ids int64 shaped like ``query``, known mask bool): ``dense[i]`` where
    ``sorted_raw[i] == query``; unknown raw ids get :data:`UNKNOWN` (0) and ``known`` False."""
    q = np.asarray(query, dtype=np.int64)
    if len(sorted_raw) == 0:
        return np.full(q.shape, UNKNOWN, dtype=np.int64), np.zeros(q.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_raw, q), len(sorted_raw) - 1)  # ids past the last: compared, unknown
    known = sorted_raw[pos] == q
    out = dense[pos].astype(np.int64, copy=False)
    if not known.all():
        out = np.where(known, out, UNKNOWN)
    return out, known


@dataclass(frozen=True)
class ItemIds:
    """The serving side of an item catalogue: raw id → dense id.

    ``sorted_raw`` (n,) int64 strictly increasing; ``dense`` (n,) int64, the dense id of each.
    ``identity(n)`` is the mapping of a model without a catalogue: raw id i = dense id i, 1..n.
    ``item_key``: how a request's item id becomes its raw id (``cachestore/store/user_keys.py``): "int" (the id
    itself) or "blake2b-63" (text ids: ``user_keys.to_keys(ids, item_key)`` first, then :meth:`to_dense`).
    """

    sorted_raw: np.ndarray
    dense: np.ndarray
    item_key: str = "int"

    @classmethod
    def from_raw_items(cls, raw_items: np.ndarray, *, item_key: str = "int") -> ItemIds:
        """From the raw id of each dense id 1..n in order (``raw_items[d - 1]`` is dense id d's)."""
        raw = np.asarray(raw_items, dtype=np.int64)
        order = np.argsort(raw, kind="stable")
        return cls(raw[order], order.astype(np.int64) + 1, item_key)

    @classmethod
    def identity(cls, n_items: int) -> ItemIds:
        ids = np.arange(1, n_items + 1, dtype=np.int64)
        return cls(ids, ids.copy())

    def __len__(self) -> int:
        return len(self.sorted_raw)

    def to_dense(self, raw: np.ndarray, *, where: str = "request") -> np.ndarray:
        """Dense ids of ``raw`` (any shape); :class:`UnknownItemError` naming the first unknown one."""
        out, known = raw_to_dense(self.sorted_raw, self.dense, raw)
        if not known.all():
            flat = np.asarray(raw, dtype=np.int64).reshape(-1)
            pos = int(np.flatnonzero(~known.reshape(-1))[0])
            raise UnknownItemError(int(flat[pos]), pos,
                                   f"{where}: item {int(flat[pos])} is not in the model's item catalogue "
                                   f"({len(self)} items, {int((~known).sum())} unknown id(s) in this request); "
                                   "score it with a model trained on a dataset that has it")
        return out
