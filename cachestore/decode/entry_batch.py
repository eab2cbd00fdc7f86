"""Batches of cache entries: model tensors ⇄ storage arrays ⇄ per-user payload bytes.

The three forms of a batch of B users' entries (parts as in :class:`cachestore.store.entry.EntryLayout`):

- *model tensors* — ``model.entry.entry_arrays``: name → (B, R, width) torch tensors (kv float,
  idx int64, keys uint8), padded with zeros, valid rows first;
- *storage arrays* — the same, as numpy at the layout's storage dtypes (:func:`storage_arrays`;
  bfloat16 as uint16 bits);
- *payloads* — one flat uint8 buffer + (B + 1) offsets; user b's payload is its parts in layout
  order, each ``min(n_b, cap)`` rows (:func:`entry_payloads`: what the prefill writes to Parquet).

:func:`stack_records` goes back from decoded records to padded storage arrays and
:func:`model_tensors` from storage arrays to model tensors (for ``model.entry.cache_from_arrays``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from collectivekv.cachestore.decode.transfer import KV_TORCH
from collectivekv.cachestore.store.entry import EntryLayout, EntryRecord
from collectivekv.cachestore.store.record import KV_DTYPES


def kv_storage(t: torch.Tensor, kv_dtype: str) -> np.ndarray:
    """A float tensor at a store's kv dtype, as a CPU numpy array of its storage dtype (bfloat16:
    raw uint16 bits) — what records hold."""
    t = t.detach().to(KV_TORCH[kv_dtype])
    if kv_dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.cpu().numpy().view(KV_DTYPES[kv_dtype][1])


def _to_storage(t: torch.Tensor, kind: str, layout: EntryLayout) -> np.ndarray:
    if kind == "kv":
        return kv_storage(t, layout.kv_dtype)
    return t.detach().cpu().numpy().astype(layout.dtype(kind), copy=False)


def storage_arrays(layout: EntryLayout, arrays: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Model tensors → numpy at the layout's storage dtypes. Index parts must fit the index dtype."""
    out = {}
    for p in layout.parts:
        t = arrays[p.name]
        if p.kind == "idx" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= layout.pool_size):
            raise ValueError(f"{p.name}: router index outside 0..{layout.pool_size - 1}")
        out[p.name] = _to_storage(t, p.kind, layout)
    return out


def entry_sizes(layout: EntryLayout, lengths: np.ndarray) -> np.ndarray:
    """(B, P) int64 bytes of every part of every user."""
    n = lengths.astype(np.int64)
    return np.stack([np.minimum(n, p.cap) * w for p, w in zip(layout.parts, layout.row_bytes, strict=True)], 1)


def entry_payloads(layout: EntryLayout, arrays: dict[str, np.ndarray], lengths: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Storage arrays of a padded batch → (uint8 values, (B + 1,) int64 offsets) of the payloads."""
    n = lengths.astype(np.int64)
    b = len(n)
    sizes = entry_sizes(layout, n) if b else np.zeros((0, len(layout.parts)), np.int64)  # (B, P)
    offsets = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(sizes.sum(1), out=offsets[1:])
    part_start = offsets[:-1, None] + np.cumsum(sizes, 1) - sizes  # (B, P)
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    for j, (p, wb) in enumerate(zip(layout.parts, layout.row_bytes, strict=True)):
        a = np.ascontiguousarray(arrays[p.name])
        if a.ndim != 3 or a.shape[0] != b or a.shape[2] != p.width:
            raise ValueError(f"{p.name}: expected (B={b}, R, {p.width}), got {a.shape}")
        rows = np.minimum(n, p.cap)  # (B,)
        if a.shape[1] > p.cap and bool((n > p.cap).any()):  # which cap rows? the latest, which the model windows
            raise ValueError(f"{p.name}: {a.shape[1]} rows for a part of {p.cap}: window the histories to their "
                             f"latest {p.cap} behaviours first (the model's prefill does)")
        if b and int(rows.max()) > a.shape[1]:
            raise ValueError(f"{p.name}: {a.shape[1]} rows < the {int(rows.max())} a user needs")
        raw = a.view(np.uint8).reshape(b, a.shape[1], wb)  # (B, R, row bytes)
        valid = np.arange(a.shape[1]) < rows[:, None]  # (B, R)
        users, r = np.nonzero(valid)
        if not len(users):
            continue
        dst = part_start[users, j] + r * wb  # (V,) start byte of each valid row
        rows_at = as_strided(out, (len(out) - wb + 1, wb), (1, 1))  # row i = out[i : i + wb] (a view)
        rows_at[dst] = raw[valid]  # (V, row bytes): one row copy per index, not one index per byte
    return out, offsets


def stack_records(layout: EntryLayout, records: Sequence[EntryRecord | None]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decoded records (None: cold start, n = 0) → ((B,) int64 lengths, padded storage arrays
    name → (B, R_p, width), R_p = max(1, longest min(n, cap)))."""
    lengths = np.array([0 if r is None else r.length for r in records], dtype=np.int64)
    longest = int(lengths.max()) if len(lengths) else 0
    out = {}
    for p in layout.parts:
        a = np.zeros((len(records), max(1, min(longest, p.cap)), p.width), dtype=layout.dtype(p.kind))
        for b, r in enumerate(records):
            if r is not None:
                part = r.arrays[p.name]
                a[b, : len(part)] = part
        out[p.name] = a
    return lengths, out


def model_tensors(layout: EntryLayout, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """Storage arrays → model tensors on ``device`` (kv at the storage float dtype, idx int64, keys uint8)."""
    out = {}
    for p in layout.parts:
        a = np.ascontiguousarray(arrays[p.name])
        if p.kind == "kv":
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if layout.kv_dtype == "bfloat16" else (
                torch.from_numpy(a))
        elif p.kind == "idx":
            t = torch.from_numpy(a.astype(np.int64))
        else:
            t = torch.from_numpy(a)
        out[p.name] = t.to(device)
    return out
