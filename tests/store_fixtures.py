"""Test helper: build a published cache store straight from ``model.prefill`` output.

Independent of the Spark prefill job (pipeline/prefill/prefill.py): rows are encoded here from the model's
own cache (collective: user parts + router indices; full: ``model.keys_values``) as the din entry's
payload (``kv.k_user | kv.v_user | kv.k_idx | kv.v_idx``), written as prefill Parquet
(``cachestore.store.lmdb_build.prefill_schema``) and built + published with the real builder.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from collectivekv.cachestore.store.entry import EntryLayout, entry_layout
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, prefill_schema
from collectivekv.cachestore.store.publish import build_and_publish
from collectivekv.cachestore.store.record import write_layout
from collectivekv.model.ctr import TargetAttentionCTR

KV_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def layout_for(model: TargetAttentionCTR, version: str, mode: str = "collective", kv_dtype: str = "float16"
               ) -> EntryLayout:
    """The EntryLayout of a store of ``model`` ("full": whole K/V, no indices)."""
    return entry_layout(model.cfg, version, mode, kv_dtype)


def _kv_bytes(t: torch.Tensor, kv_dtype: str) -> bytes:
    t = t.detach().to(KV_TORCH[kv_dtype]).contiguous()
    if kv_dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.cpu().numpy().tobytes()


def prefill_rows(model: TargetAttentionCTR, layout: EntryLayout, user_ids: list[int], items: torch.Tensor,
                 feedback: torch.Tensor, lengths: torch.Tensor) -> list[dict]:
    """Prefill Parquet rows (dicts) of these users' padded histories."""
    with torch.no_grad():
        cache = model.prefill(items, feedback, lengths)
        if layout.mode == "full":
            k, v = model.keys_values(cache)
            k_idx = v_idx = None
        else:
            k, v, k_idx, v_idx = cache.k_user, cache.v_user, cache.k_idx, cache.v_idx
    idx_np = np.dtype("<u2") if layout.idx_dtype == "uint16" else np.dtype("<i4")
    rows = []
    for b, uid in enumerate(user_ids):
        n = int(lengths[b])
        parts = [_kv_bytes(k[b, :n], layout.kv_dtype), _kv_bytes(v[b, :n], layout.kv_dtype)]
        parts += [idx[b, :n].cpu().numpy().astype(idx_np).tobytes() for idx in (k_idx, v_idx) if idx is not None]
        payload = b"".join(parts)
        rows.append({"user_id": int(uid), "length": n, "payload": payload, "model_version": layout.model_version,
                     "checksum": zlib.crc32(payload)})
    return rows


def build_store(root: Path, rows: list[dict], layout: EntryLayout) -> Path:
    """Write rows as prefill Parquet under root/parquet, build and publish; returns root."""
    pdir = Path(root) / "parquet"
    pdir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=prefill_schema())
    pq.write_table(table, pdir / "part-00000.parquet")
    write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
    build_and_publish(root)
    return Path(root)


def store_of_model(root: Path, model: TargetAttentionCTR, version: str, user_ids: list[int], items: torch.Tensor,
                   feedback: torch.Tensor, lengths: torch.Tensor, mode: str = "collective",
                   kv_dtype: str = "float16") -> Path:
    """Prefill these users with ``model`` and publish the store under root."""
    layout = layout_for(model, version, mode, kv_dtype)
    return build_store(root, prefill_rows(model, layout, user_ids, items, feedback, lengths), layout)


def put_in_place(version: Path, values: dict[int, bytes]) -> None:
    """Overwrite records of a published version through LMDB (simulated corruption of an immutable
    version; tests only) and re-record the LMDB file's facts in its manifest (``lmdb`` block and
    ``stats.file_bytes``), so that only the records are damaged, not the file as the manifest knows it."""
    import json

    import lmdb

    from collectivekv.cachestore.store.record import user_key
    from collectivekv.cachestore.store.store_tree import lmdb_facts

    version = Path(version)
    env = lmdb.open(str(version / "lmdb"), map_size=1 << 26, subdir=True, max_dbs=0)
    with env.begin(write=True) as txn:
        for uid, value in values.items():
            txn.put(user_key(uid), value)
    env.close()
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["lmdb"] = lmdb_facts(version / "lmdb")
    manifest["stats"]["file_bytes"] = manifest["lmdb"]["file_bytes"]
    (version / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
