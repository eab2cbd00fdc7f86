"""`ckv store verify`: rebuild K, V from the published LMDB records (user part + the model's pool rows)
and compare them with the model's own K, V for the same histories.

The reference side is computed independently of the prefill job: ``model.prefill`` on the padded
window (:func:`pipeline.history.arrow_window`) and ``model.keys_values``; the store side is decoded
by ``StoreReader`` (CRC + model version checked) and rebuilt through ``model.keys_values`` on a
KVCache made of the record's parts. Values must agree within the kv dtype's rounding (2 ulp relative
+ 1e-5 absolute); lengths and router indices exactly; every history user must have a record and the
store must hold exactly as many users as the histories (a full check therefore matches the sets).
Memory: one batch of users at a time (``--sample N`` picks N row numbers first).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from cachestore.reader import StoreReader
from cachestore.record import Record
from model.cache import KVCache
from pipeline.checkpoint import load_checkpoint
from pipeline.history import arrow_window

log = logging.getLogger("ckv.verify")
RTOL = {"float16": 2 * 2.0**-10, "bfloat16": 2 * 2.0**-7, "float32": 1e-5}
ATOL = 1e-5


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


def _records_cache(records: list[Record], width: int, device: torch.device) -> KVCache:
    """A padded KVCache (B, width, .) made of decoded records' parts (fp32 values, int64 indices)."""
    b = len(records)
    r0 = records[0]

    def values(name: str, d: int) -> torch.Tensor:
        out = torch.zeros(b, width, d, dtype=torch.float32)
        for i, r in enumerate(records):
            a = getattr(r, name)
            t = torch.from_numpy(a.copy())
            t = t.view(torch.bfloat16) if r.kv_dtype == "bfloat16" else t
            out[i, : r.length] = t.float()
        return out.to(device)

    def indices(name: str) -> torch.Tensor | None:
        if getattr(r0, name) is None:
            return None
        out = torch.zeros(b, width, dtype=torch.int64)
        for i, r in enumerate(records):
            out[i, : r.length] = torch.from_numpy(getattr(r, name).astype(np.int64))
        return out.to(device)

    lengths = torch.tensor([r.length for r in records], dtype=torch.int64, device=device)
    return KVCache(values("k_user", r0.dk), values("v_user", r0.dv), indices("k_idx"), indices("v_idx"), lengths)


def verify_store(store: str | Path, checkpoint: str | Path, histories: str | Path, *, sample: int | None = None,
                 seed: int = 0, batch_users: int = 64, device: str = "cpu") -> VerifyResult:
    """Check the published store against the model (see module docstring)."""
    t0 = time.perf_counter()
    reader = StoreReader.open_current(store)
    layout = reader.layout
    ckpt = load_checkpoint(checkpoint, device=device)
    model = ckpt.model
    ds = history_dataset(histories)
    total = ds.count_rows()
    res = VerifyResult(reader.version_id, ckpt.model_version, len(reader), total)
    if ckpt.model_version != layout.model_version:
        res.add(f"store was built by model {layout.model_version}, checkpoint is {ckpt.model_version}")
        return res
    if layout.max_len != model.cfg.max_len:
        res.add(f"store max_len {layout.max_len} != model max_len {model.cfg.max_len}")
        return res
    if res.users_in_store != total:
        res.add(f"store holds {res.users_in_store} users, histories {total}")
    chosen = None
    if sample is not None and sample < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False))
    rtol = RTOL[layout.kv_dtype]
    row0 = 0
    dev = torch.device(device)
    for batch in ds.to_batches(columns=["user_id", "items", "labels"], batch_size=batch_users):
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
        _check_batch(batch, model, reader, layout, res, rtol, dev)
    res.seconds = time.perf_counter() - t0
    reader.close()
    return res


def _check_batch(batch: pa.RecordBatch, model: torch.nn.Module, reader: StoreReader, layout, res: VerifyResult,
                 rtol: float, dev: torch.device) -> None:
    users = batch.column("user_id").to_numpy().astype(np.int64)
    w = arrow_window(batch.column("items"), batch.column("labels"), layout.max_len)
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
        got = _records_cache([records[i] for i in keep], width, dev)
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
