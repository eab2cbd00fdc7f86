"""Test helper: publish a zoo cache store (record format v2) straight from a zoo model's prefill.

Rows are the v2 prefill Parquet rows (``cachestore.entry.entry_schema``: user_id, length, payload,
model_version, checksum) made from the model's own cache (collective; or, mode "full", every group's
K/V rebuilt at d_a by ``model.entry.full_cache``). Until ``cachestore.lmdb_build`` reads v2 Parquet,
:func:`build_zoo_store` encodes the rows with ``entry_from_parquet_row`` (the builder's own check),
writes them to LMDB in a staging version directory (lmdb/, layout.json, manifest.json) and
publishes it with the real ``cachestore.publish.publish`` (atomic switch of ``STORE/current``).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import lmdb
import torch

from cachestore.entry import EntryLayout, entry_from_parquet_row, entry_layout
from cachestore.entry_batch import entry_payloads, storage_arrays
from cachestore.publish import LAYOUT, LMDB_DIR, MANIFEST, new_staging_dir, publish
from cachestore.record import user_key, write_layout
from model.blocks import ZooCache
from model.cache import KVCache
from model.entry import entry_arrays, full_cache


def zoo_prefill_rows(model: torch.nn.Module, layout: EntryLayout, user_ids: list[int], items: torch.Tensor,
                     feedback: torch.Tensor, lengths: torch.Tensor) -> list[dict]:
    """v2 prefill Parquet rows (dicts) of these users' padded histories."""
    cfg = model.cfg
    with torch.no_grad():
        cache = model.prefill(items, feedback, lengths)
        if isinstance(cache, KVCache):  # the din arch: its one group is "kv"
            if layout.mode == "full":
                k, v = model.keys_values(cache)
                cache = KVCache(k, v, None, None, cache.lengths)
            cache = ZooCache(lengths=cache.lengths, kv={"kv": cache}, keys={})
        elif layout.mode == "full":
            cache = full_cache(model, cache)
        if layout.mode == "full":
            cfg = dataclasses.replace(cfg, kv_mode="full")
        arrays = storage_arrays(layout, entry_arrays(cache, cfg))
    n = cache.lengths.numpy()
    values, offsets = entry_payloads(layout, arrays, n)
    rows = []
    for b, uid in enumerate(user_ids):
        payload = values[offsets[b] : offsets[b + 1]].tobytes()
        rows.append({"user_id": int(uid), "length": int(n[b]), "payload": payload,
                     "model_version": layout.model_version, "checksum": zlib.crc32(payload)})  # fmt: skip
    return rows


def publish_records(root: Path, layout: EntryLayout, records: dict[int, bytes]) -> Path:
    """Publish a version holding these encoded records (user id → LMDB value) as-is; returns root."""
    root = Path(root)
    staging = new_staging_dir(root)
    env = lmdb.open(str(staging / LMDB_DIR), map_size=16 << 20, subdir=True)
    with env.begin(write=True) as txn:
        for uid in sorted(records):
            txn.put(user_key(uid), records[uid], append=True)
    env.close()
    write_layout(staging / LAYOUT, layout)
    manifest = {"version_id": staging.name, "layout": layout.to_dict(), "stats": {"users": len(records)},
                "record_format_version": 2}  # fmt: skip
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    publish(root, staging)
    return root


def build_zoo_store(root: Path, rows: list[dict], layout: EntryLayout) -> Path:
    """Encode v2 prefill rows (checked like the builder does) and publish them under root."""
    records = {row["user_id"]: entry_from_parquet_row(layout, **row) for row in rows}
    return publish_records(root, layout, records)


def zoo_store_of_model(root: Path, model: torch.nn.Module, version: str, user_ids: list[int], items: torch.Tensor,
                       feedback: torch.Tensor, lengths: torch.Tensor, mode: str = "collective",
                       kv_dtype: str = "float16") -> Path:
    """Prefill these users with the zoo ``model`` and publish the v2 store under root."""
    layout = entry_layout(model.cfg, version, mode, kv_dtype)
    return build_zoo_store(root, zoo_prefill_rows(model, layout, user_ids, items, feedback, lengths), layout)
