"""`ckv store verify`: rebuild K, V from the published LMDB records (user part + the model's pool rows)
and compare them with the model's own K, V for the same histories.

The reference side is computed independently of the prefill job: ``model.prefill`` on the padded
window (:func:`pipeline.data.history.arrow_window`) and ``model.keys_values``; the store side is decoded
by ``StoreReader`` / ``cachestore.store.entry.decode_entry`` (CRC, model version, layout checked), stacked
into a padded batch (``cachestore.decode.entry_batch``), turned back into a cache
(``model.entry.cache_from_arrays``, values as fp32; din: its group ``"kv"``) and rebuilt through
``model.keys_values``. Values must agree within the kv dtype's rounding (2 ulp relative
+ 1e-5 absolute); lengths and router indices exactly; every history user must have a record, no user may have
two history rows, and the store must hold exactly as many users as the histories have (a full check therefore
matches the sets).
Memory: one batch of users at a time (``--sample N`` picks N row numbers first). A sharded version is read
through :class:`cachestore.store.sharded_reader.ShardedReader` after the deep check of every shard
(:func:`cachestore.store.sharded_reader.check_shards`: B-tree, users in their own shard, digest).

Zoo stores (SIM, ETA, SDIM, TWIN, HSTU): the window is the model's ``window_len``; each record is
read raw (``get_raw``) so that a bad one is reported, not raised. Every K/V group is rebuilt
by ``model.keys_values`` and compared with ``model.keys_values(model.prefill(history))`` (mode
full: the stored K/V are the rebuilt ones, compared the same way); router indices and retrieval keys
(``cache.keys``) must be equal exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from collectivekv.cachestore.checkpoint import load_checkpoint
from collectivekv.cachestore.decode.entry_batch import model_tensors, stack_records
from collectivekv.cachestore.store.entry import EntryLayout, EntryRecord, decode_entry
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.cachestore.store.record import RecordError
from collectivekv.cachestore.store.sharded_reader import ShardedReader, check_shards, open_reader
from collectivekv.cachestore.store.store_tree import check_tree
from collectivekv.model.blocks import ZooCache
from collectivekv.model.cache_spec import store_config
from collectivekv.model.entry import cache_from_arrays, user_scales
from collectivekv.model.events import EventSpec
from collectivekv.pipeline.data.history import arrow_window

log = logging.getLogger("ckv.verify")
RTOL = {"float16": 2 * 2.0**-10, "bfloat16": 2 * 2.0**-7, "float32": 1e-5}
ATOL = 1e-5
Reader = StoreReader | ShardedReader


@dataclass
class VerifyResult:
    store_version: str
    model_version: str
    users_in_store: int
    users_in_histories: int
    users_checked: int = 0
    behaviours_checked: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    mismatches: list[str] = field(default_factory=list)
    mismatch_count: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.mismatch_count == 0

    def add(self, message: str, keep: int = 20) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < keep:
            self.mismatches.append(message)


def history_dataset(path: str | Path) -> pads.Dataset:
    """Histories as a pyarrow dataset: a Parquet file, a directory of them, or a canonical dataset dir."""
    p = Path(str(path).removeprefix("file://"))
    if p.is_dir() and (p / "meta.json").is_file() and (p / "histories.parquet").is_file():
        p = p / "histories.parquet"
    if not p.exists():
        raise FileNotFoundError(f"histories {path}: no such file or directory")
    ds = pads.dataset(str(p), format="parquet")
    for name in ("user_id", "items", "labels"):
        if name not in ds.schema.names:
            raise ValueError(f"histories {p}: missing column {name!r} (columns: {ds.schema.names})")
    return ds


def _stored_cache(layout: EntryLayout, records: list[EntryRecord], model: torch.nn.Module, device: torch.device
                  ) -> ZooCache:
    """The cache (fp32 values — int8 codes times the model's scales —, int64 indices, padded to the longest
    record) made of decoded records."""
    lengths, stacked = stack_records(layout, records)
    tensors = model_tensors(layout, stacked, device)
    kinds = {p.name: p.kind for p in layout.parts}
    tensors = {k: (t.float() if kinds[k] == "kv" else t) for k, t in tensors.items()}
    return cache_from_arrays(tensors, torch.from_numpy(lengths).to(device), store_config(model.cfg, layout.mode),
                             user_scales(model, model.cfg))


def verify_store(store: str | Path, checkpoint: str | Path, histories: str | Path, *, sample: int | None = None,
                 seed: int = 0, batch_users: int = 64, device: str = "cpu") -> VerifyResult:
    """Check the published store against the model (see module docstring)."""
    with open_reader(Path(store)) as reader:  # closed on errors too (a bad record raises RecordError)
        return _verify(reader, checkpoint, histories, sample, seed, batch_users, device)


def _verify(reader: Reader, checkpoint: str | Path, histories: str | Path, sample: int | None,
            seed: int, batch_users: int, device: str) -> VerifyResult:
    t0 = time.perf_counter()
    # every LMDB page the records hang from, before any record is read; a sharded version: every shard's, its
    # users all its own and its records' digest as published
    if isinstance(reader, ShardedReader):
        shard_problems = check_shards(reader)
    else:
        check_tree(reader.version_dir)
        shard_problems = []
    layout = reader.layout
    ckpt = load_checkpoint(checkpoint, device=device)
    model = ckpt.model
    ds = history_dataset(histories)
    total = ds.count_rows()
    res = VerifyResult(reader.version_id, ckpt.model_version, len(reader), total)
    for problem in shard_problems:
        res.add(problem)
    if ckpt.model_version != layout.model_version:
        res.add(f"store was built by model {layout.model_version}, checkpoint is {ckpt.model_version}")
        return res
    if layout.arch != model.cfg.arch:
        res.add(f"store arch {layout.arch!r} != checkpoint arch {model.cfg.arch!r}")
        return res
    zoo = layout.arch != "din"
    if layout.max_len != model.cfg.window_len:
        res.add(f"store max_len {layout.max_len} != model window {model.cfg.window_len}")
        return res
    ids, counts = np.unique(ds.to_table(columns=["user_id"]).column("user_id").to_numpy(), return_counts=True)
    if len(ids) != total:  # a repeated row would make the counts agree while a stored user goes unchecked
        first = int(np.argmax(counts > 1))
        res.add(f"histories hold {total} rows for {len(ids)} users: user {ids[first]} has {counts[first]} rows")
    if res.users_in_store != len(ids):
        res.add(f"store holds {res.users_in_store} users, histories {len(ids)}")
    chosen = None
    if sample is not None and sample < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False))
    rtol = RTOL[layout.kv_dtype]
    row0 = 0
    dev = torch.device(device)
    cols = ["user_id", "items", "labels", *(["timestamps"] if model.cfg.event_features else [])]
    for batch in ds.to_batches(columns=cols, batch_size=batch_users):
        n = batch.num_rows
        if chosen is not None:
            lo, hi = np.searchsorted(chosen, [row0, row0 + n])
            take = chosen[lo:hi] - row0
            row0 += n
            if not len(take):
                continue
            batch = batch.take(pa.array(take))
        else:
            row0 += n
        (_check_zoo_batch if zoo else _check_batch)(batch, model, reader, layout, res, rtol, dev)
    res.seconds = time.perf_counter() - t0
    return res


def _window(batch: pa.RecordBatch, model: torch.nn.Module, max_len: int) -> Any:
    """The model's window of a batch of histories (its per-event features read ``timestamps``)."""
    events = EventSpec.of(model.cfg)
    ts = batch.column("timestamps") if events.features else None
    return arrow_window(batch.column("items"), batch.column("labels"), max_len, ts, events)


def _check_batch(batch: pa.RecordBatch, model: torch.nn.Module, reader: Reader, layout, res: VerifyResult,
                 rtol: float, dev: torch.device) -> None:
    users = batch.column("user_id").to_numpy().astype(np.int64)
    w = _window(batch, model, layout.max_len)
    records = reader.get_many(users.tolist())
    keep = []
    for i, (uid, rec) in enumerate(zip(users.tolist(), records, strict=True)):
        if rec is None:
            res.add(f"user {uid}: no record in the store")
        elif rec.length != int(w.lengths[i]):
            res.add(f"user {uid}: record length {rec.length} != window length {int(w.lengths[i])}")
        else:
            keep.append(i)
    if not keep:
        return
    sel = np.asarray(keep)
    width = max(1, int(w.lengths[sel].max()))
    items_t = torch.from_numpy(w.items[sel, :width]).to(dev)
    fb_t = torch.from_numpy(w.feedback[sel, :width]).to(dev)
    len_t = torch.from_numpy(w.lengths[sel]).to(dev)
    with torch.inference_mode():
        ref = model.prefill(items_t, fb_t, len_t)
        k_ref, v_ref = model.keys_values(ref)
        got = _stored_cache(layout, [records[i] for i in keep], model, dev).kv["kv"]
        k_got, v_got = model.keys_values(got)
    valid = torch.arange(width, device=dev)[None, :] < len_t[:, None]
    res.users_checked += len(keep)
    res.behaviours_checked += int(valid.sum())
    bad_users: dict[int, str] = {}
    if layout.mode == "collective":
        for name, a, b in (("k_idx", got.k_idx, ref.k_idx), ("v_idx", got.v_idx, ref.v_idx)):
            if a is not None:
                diff = (a != b) & valid
                for r in torch.nonzero(diff.any(1)).flatten().tolist():
                    p = int(torch.nonzero(diff[r])[0])
                    bad_users.setdefault(r, f"{name} at position {p}: stored {int(a[r, p])}, model {int(b[r, p])}")
    for name, a, b in (("K", k_got, k_ref), ("V", v_got, v_ref)):
        a, b = a[valid].float(), b[valid].float()
        err = (a - b).abs()
        if err.numel():
            res.max_abs_err = max(res.max_abs_err, float(err.max()))
            res.max_rel_err = max(res.max_rel_err, float((err / b.abs().clamp(min=1e-6)).max()))
        bad = (err > ATOL + rtol * b.abs()).any(-1)  # per valid behaviour
        if bad.any():
            owner = torch.nonzero(valid)[bad][:, 0].unique().tolist()
            for r in owner:
                bad_users.setdefault(r, f"{name} differs beyond tolerance (max abs err {float(err.max()):.3g})")
    for r, msg in sorted(bad_users.items()):
        res.add(f"user {int(users[sel[r]])}: {msg}")


def _check_zoo_batch(batch: pa.RecordBatch, model: torch.nn.Module, reader: Reader, layout: EntryLayout,
                     res: VerifyResult, rtol: float, dev: torch.device) -> None:
    """A zoo store: every K/V group, router index and retrieval key of a batch of users."""
    users = batch.column("user_id").to_numpy().astype(np.int64)
    w = _window(batch, model, layout.max_len)
    keep, records = [], []
    for i, uid in enumerate(users.tolist()):
        raw = reader.get_raw(uid)
        if raw is None:
            res.add(f"user {uid}: no record in the store")
            continue
        try:
            rec = decode_entry(layout, raw, expected_model_version=layout.model_version, user_id=uid)
        except RecordError as exc:
            res.add(str(exc))
            continue
        if rec.length != int(w.lengths[i]):
            res.add(f"user {uid}: record length {rec.length} != window length {int(w.lengths[i])}")
            continue
        keep.append(i)
        records.append(rec)
    if not keep:
        return
    sel = np.asarray(keep)
    width = max(1, int(w.lengths[sel].max()))
    len_t = torch.from_numpy(w.lengths[sel]).to(dev)
    with torch.inference_mode():
        ref = model.prefill(torch.from_numpy(w.items[sel, :width]).to(dev),
                            torch.from_numpy(w.feedback[sel, :width]).to(dev), len_t)
        got = _stored_cache(layout, records, model, dev)
        kv_ref, kv_got = model.keys_values(ref), model.keys_values(got)
    res.users_checked += len(keep)
    res.behaviours_checked += int(len_t.sum())
    bad_users = _zoo_differences(ref, got, kv_ref, kv_got, layout.mode, res, rtol, dev)
    for u, msg in sorted(bad_users.items()):
        res.add(f"user {int(users[sel[u]])}: {msg}")


def _zoo_differences(ref: Any, got: Any, kv_ref: dict, kv_got: dict, mode: str, res: VerifyResult, rtol: float,
                     dev: torch.device) -> dict[int, str]:
    """Batch row → the first difference of the stored zoo cache ``got`` from the model's ``ref``: retrieval
    keys and router indices exactly, K and V within tolerance (the largest errors go to ``res``)."""
    bad_users: dict[int, str] = {}

    def first_diff(name: str, a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> None:
        """Exact comparison of (B, R[, m]) integer tensors over valid rows."""
        r = min(a.shape[1], b.shape[1])
        diff = (a[:, :r] != b[:, :r]).reshape(a.shape[0], r, -1).any(-1) & valid[:, :r]
        for u in torch.nonzero(diff.any(1)).flatten().tolist():
            p = int(torch.nonzero(diff[u])[0])
            bad_users.setdefault(u, f"{name} at row {p}: stored {a[u, p].tolist()}, model {b[u, p].tolist()}")

    def rows_valid(n: torch.Tensor, r: int) -> torch.Tensor:
        return torch.arange(r, device=dev)[None, :] < n[:, None]

    for name, key in ref.keys.items():
        first_diff(f"retrieval key {name}", got.keys[name], key, rows_valid(ref.lengths, key.shape[1]))
    for group, (k_ref, v_ref) in kv_ref.items():
        k_got, v_got = kv_got[group]
        n = ref.kv[group].lengths
        r = min(v_ref.shape[1], v_got.shape[1])
        valid = rows_valid(n, r)
        if mode == "collective":
            for side in ("k_idx", "v_idx"):
                a, b = getattr(got.kv[group], side), getattr(ref.kv[group], side)
                if a is not None and b is not None:
                    first_diff(f"{group}.{side}", a, b, rows_valid(n, min(a.shape[1], b.shape[1])))
        for name, a, b in ((f"{group} K", k_got, k_ref), (f"{group} V", v_got, v_ref)):
            if a.shape[-1] == 0:  # a V-only group (SDIM's long stage)
                continue
            a, b = a[:, :r][valid].float(), b[:, :r][valid].float()
            err = (a - b).abs()
            if err.numel():
                res.max_abs_err = max(res.max_abs_err, float(err.max()))
                res.max_rel_err = max(res.max_rel_err, float((err / b.abs().clamp(min=1e-6)).max()))
            bad = (err > ATOL + rtol * b.abs()).any(-1)  # per valid row
            if bad.any():
                for u in torch.nonzero(valid)[bad][:, 0].unique().tolist():
                    bad_users.setdefault(u, f"{name} differs beyond tolerance (max abs err {float(err.max()):.3g})")
    return bad_users
