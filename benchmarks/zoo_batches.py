"""The zoo benchmarks' stores and batches: a model's collective store layout, synthetic records of full histories,
the batch a serving runtime with graphs packs (HSTU's split by layer) and the cache a packed batch holds."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from benchmarks.paper_store import collective_layout, synthetic_records
from benchmarks.zoo_synthetic import N_ITEMS, PAPER, make_models, model_config, synthetic_cache
from collectivekv.cachestore.decode.batch import HostBatch, HostBatcher
from collectivekv.cachestore.decode.decode import entry_cache
from collectivekv.cachestore.decode.entry_batch import entry_payloads, storage_arrays
from collectivekv.cachestore.decode.layer_batch import LayerBatch, LayerBatcher, split_layouts
from collectivekv.cachestore.decode.transfer import to_device
from collectivekv.cachestore.store.entry import entry_from_parquet_row, entry_layout
from collectivekv.model.blocks import ZooCache
from collectivekv.model.config import ModelConfig
from collectivekv.model.entry import entry_arrays, user_scales

VERSION = "0123456789abcdef"


def store_layout(cfg: ModelConfig, kv_dtype: str) -> object:
    """The collective store's layout: din's is ``paper_store.collective_layout`` (the din store the
    graphs serve), a zoo model's its ``entry_layout``."""
    if cfg.arch == "din" and not cfg.joint_index:
        layout = collective_layout(cfg.max_len, VERSION, kv_dtype)
        if layout.pool_size != cfg.collective.pool_size:
            raise ValueError(f"din's store layout has a pool of {layout.pool_size} rows, the model {cfg.collective}")
        return layout
    return entry_layout(cfg, VERSION, "collective", kv_dtype)


def store_records(model: torch.nn.Module, layout: object, n_users: int, kv_dtype: str, device: torch.device
                  ) -> list[bytes]:
    """One record per user, full histories: din's ``paper_store.synthetic_records``; a zoo model's from
    :func:`synthetic_cache` (its entry parts at the store's storage dtypes, ``cachestore.decode.entry_batch``)."""
    cfg = model.cfg
    if cfg.arch == "din" and not cfg.joint_index:
        return synthetic_records(layout, n_users, cfg.max_len, seed=1)
    cache = synthetic_cache(model, n_users, kv_dtype, 1, device)
    arrays = storage_arrays(layout, entry_arrays(cache, cfg, user_scales(model, cfg)))
    n = cache.lengths.cpu().numpy()
    values, offsets = entry_payloads(layout, arrays, n)
    out = []
    for b in range(len(n)):
        payload = values[offsets[b]: offsets[b + 1]].tobytes()
        out.append(entry_from_parquet_row(layout, user_id=b, length=int(n[b]), payload=payload,
                                          model_version=VERSION, checksum=zlib.crc32(payload)))
    return out


def paper_batch(arch: str, b: int, kv_dtype: str, device: torch.device, split: bool = True
                ) -> tuple[ModelConfig, torch.nn.Module, object, HostBatch, torch.Tensor]:
    """(config, model, store layout, pinned batch of ``b`` users with full histories of L 1,000, candidates (b, 1)) at
    the paper's shape: what the benchmarks timing one serving graph per setting serve (``split`` False: HSTU's
    one-buffer batch too)."""
    cfg = model_config(arch, 1000, PAPER, N_ITEMS)
    model = make_models(cfg, seed=0)[0].to(device)
    layout = store_layout(cfg, kv_dtype)
    host = serving_batcher(layout, device, b, split).pack(np.arange(b), store_records(model, layout, b, kv_dtype,
                                                                                      device))
    cand = torch.randint(1, cfg.n_items + 1, (b, 1), generator=torch.Generator().manual_seed(3))
    return cfg, model, layout, host, cand


def serving_batcher(layout: object, device: torch.device, b: int, split: bool = True) -> HostBatcher:
    """The batcher a serving runtime with graphs packs ``b`` users of this store with: an HSTU store's batches split
    by layer (``cachestore.decode.layer_batch``) on CUDA (unless not ``split``), every other store's (and on CPU) one
    pinned buffer."""
    kind = LayerBatcher if split and device.type == "cuda" and split_layouts(layout) is not None else HostBatcher
    return kind(layout, pin=device.type == "cuda", n_buffers=1, batch_users=b)


def batch_bytes(host: HostBatch) -> int:
    """Bytes a packed batch moves to the device (both buffers of a batch split by layer)."""
    return host.used_bytes + getattr(host, "rest_bytes", 0)


def one_buffer(host: HostBatch, pin: bool = False) -> HostBatch:
    """``host`` as a one-buffer batch: a batch split by layer repacked from its records (pinned or not), any other as
    it is."""
    if not isinstance(host, LayerBatch):
        return host
    records = [host.record(b) for b in range(host.n_users)]
    return HostBatcher(host.layout, pin=pin, n_buffers=1).pack(host.user_ids, records)


def packed_cache(host: HostBatch, model: torch.nn.Module, device: torch.device) -> ZooCache:
    """The collective cache a packed batch holds, as the model decodes it (kv parts in fp32, int8 codes ×
    the model's scales): one copy of its :func:`one_buffer` batch and the eager unpack
    (``cachestore.decode.transfer``), a din batch as the one group "kv"."""
    return entry_cache(to_device(one_buffer(host), device)[0].unpack(), model.cfg, torch.float32,
                       user_scales(model, model.cfg))
