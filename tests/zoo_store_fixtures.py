"""Test helper: publish a zoo cache store straight from a zoo model's prefill.

Independent of the Spark prefill job (pipeline/prefill/prefill.py): rows are the prefill Parquet rows
(``cachestore.store.entry.entry_schema``: user_id, length, payload, model_version, checksum) made here from
the model's own cache (collective; or, mode "full", every group's K/V rebuilt at d_a by
``model.entry.full_cache``), written as Parquet + ``_layout.json`` and built + published with the real
builder (:func:`build_zoo_store`). :func:`publish_records` publishes hand-made record bytes as they
are (bad-record tests): LMDB written directly in a staging version directory (lmdb/, layout.json,
manifest.json), then the real ``cachestore.store.publish.publish``.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import lmdb
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from collectivekv.cachestore.decode.entry_batch import entry_payloads, storage_arrays
from collectivekv.cachestore.store.entry import EntryLayout, entry_layout, entry_schema
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE
from collectivekv.cachestore.store.publish import (
    LAYOUT,
    LMDB_DIR,
    MANIFEST,
    build_and_publish,
    new_staging_dir,
    publish,
)
from collectivekv.cachestore.store.record import user_key, write_layout
from collectivekv.model.blocks import ZooCache
from collectivekv.model.cache import KVCache
from collectivekv.model.entry import entry_arrays, full_cache, user_scales


def zoo_prefill_rows(model: torch.nn.Module, layout: EntryLayout, user_ids: list[int], items: torch.Tensor,
                     feedback: torch.Tensor, lengths: torch.Tensor) -> list[dict]:
    """Prefill Parquet rows (dicts) of these users' padded histories (int8 user parts as codes of the model's
    scales)."""
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
        arrays = storage_arrays(layout, entry_arrays(cache, cfg, user_scales(model, cfg)))
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
    """Write prefill rows as Parquet under root/parquet, build and publish; returns root."""
    pdir = Path(root) / "parquet"
    pdir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=entry_schema()), pdir / "part-00000.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    build_and_publish(root)
    return Path(root)


def zoo_store_of_model(root: Path, model: torch.nn.Module, version: str, user_ids: list[int], items: torch.Tensor,
                       feedback: torch.Tensor, lengths: torch.Tensor, mode: str = "collective",
                       kv_dtype: str = "float16") -> Path:
    """Prefill these users with the zoo ``model`` and publish the store under root."""
    layout = entry_layout(model.cfg, version, mode, kv_dtype)
    return build_zoo_store(root, zoo_prefill_rows(model, layout, user_ids, items, feedback, lengths), layout)
