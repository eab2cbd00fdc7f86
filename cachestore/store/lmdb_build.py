"""Build an LMDB cache store from the prefill Parquet (one process, sorted bulk load).

Input: PARQUET_DIR/*.parquet (part files, any order, one row per user; columns `prefill_schema()`
= `cachestore.store.entry.entry_schema()`: one `payload` per user) plus PARQUET_DIR/_layout.json, the
store's EntryLayout (record sizes from `EntryLayout.record_sizes`). Output: OUT_DIR/data.mdb
(+ lock.mdb), the unnamed main database only: key = user id as 8-byte big-endian unsigned, value =
one record (entry.py).
No other keys: the layout lives in JSON beside the store (see publish.py).

Order and memory (bounded: never the whole dataset in memory):
  pass 1 reads only `user_id` and `length` of every file (16 B/user; fine for tens of millions),
  checks ids (non-negative, unique) and argsorts them in memory; record sizes follow from lengths.
  If every file is sorted by user id and the files' id ranges are disjoint (Spark range-partition +
  sortWithinPartitions), pass 2 streams the files in key order straight into LMDB. Otherwise pass 2
  encodes rows in file order into a temporary spill file (offsets known from the sizes) and pass 3
  reads it back through mmap in key order. Either way LMDB gets sorted keys with append=True, in write
  transactions of at most TXN_BYTES (32 MiB) of records each, one for a smaller store: the fastest load, the
  smallest file (a few pages per extra transaction) and memory bounded by one transaction's dirty pages.
map_size: pre-sized from the exact record sizes (1.3x + slack); on MapFullError the open transaction is
aborted, the map doubled (no transaction open) and that transaction's records loaded again.
writemap: off. Measured (1M puts of 232 B, py-lmdb 3.0, this machine) 2.0M puts/s with writemap vs
0.9-1.1M without, but writemap makes data.mdb as large as map_size (sparse); encoding in Python
dominates the build anyway, so the plain file wins.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from collectivekv.cachestore.store.entry import (
    ENTRY_FORMAT_VERSION,
    EntryLayout,
    entry_from_parquet_row,
    entry_schema,
    read_layout,
)
from collectivekv.cachestore.store.record import HEADER_SIZE, RecordError, user_key

T = TypeVar("T")
PARQUET_LAYOUT_FILE = "_layout.json"
_BIN = (pa.binary(), pa.large_binary())
_WIDE = {pa.binary(): _BIN, pa.string(): (pa.string(), pa.large_string())}  # also accept the large variants
_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {f.name: _WIDE.get(f.type, (f.type,)) for f in entry_schema()}
_PAGE = 4096
_INLINE_MAX = 2000  # LMDB puts larger nodes (key + value + 8) on overflow pages (4 KiB pages)
# values per write transaction: LMDB keeps a transaction's dirty pages in memory (without writemap; up to 2^17
# dirty entries, which for multi-page overflow records is gigabytes), so a large store loads in several
# transactions (measured: 3M records of 1.15 KB, peak RSS 534 MB in one transaction, 64 MB in 32 MiB ones;
# data.mdb 45 KB larger, 0.001%). Commits do not sync (the build is unpublished until the end, one sync)
TXN_BYTES = 32 << 20


class StoreBuildError(ValueError):
    """The Parquet input cannot become a store (schema, duplicate or negative user ids, ...)."""


def prefill_schema() -> pa.Schema:
    """The Arrow schema the prefill job writes (binary may also be large_binary, string large_string)."""
    return entry_schema()


@dataclass(frozen=True)
class BuildStats:
    """What build_lmdb wrote. payload_bytes excludes the 32-byte record headers; file_bytes is
    data.mdb's size, disk_bytes its allocated blocks. part_rows: rows stored per part over all users
    (sum of min(n, cap)), e.g. for the size report's full-KV bytes."""

    layout: EntryLayout
    users: int
    empty_users: int
    behaviours: int
    payload_bytes: int
    record_bytes: int
    file_bytes: int
    disk_bytes: int
    map_size: int
    map_retries: int
    sorted_input: bool
    seconds: float
    part_rows: dict[str, int] | None = None


def list_parquet_files(parquet_dir: str | os.PathLike) -> list[Path]:
    """The data files of a Parquet directory, by name; skips `_*` / `.*` (Spark's _SUCCESS, .crc)."""
    return sorted(p for p in Path(parquet_dir).iterdir()
                  if p.is_file() and p.suffix == ".parquet" and not p.name.startswith(("_", ".")))


def map_bytes(sizes: np.ndarray) -> int:
    """Bytes these records take in LMDB pages (leaf nodes inline or overflow pages); additive over records."""
    node = sizes + 8 + 8 + 2  # key + node header + page index slot
    overflow = node > _INLINE_MAX
    pages = -(-(sizes[overflow] + 16) // _PAGE)
    return int(node[~overflow].sum()) + int(pages.sum()) * _PAGE + int(overflow.sum()) * 32


def map_size_for(total: int) -> int:
    """The LMDB map size for records of :func:`map_bytes` ``total``: x1.3 + 8 MiB, whole MiB."""
    return -(-(int(total * 1.3) + (8 << 20)) // (1 << 20)) << 20


def estimate_map_size(sizes: np.ndarray) -> int:
    """LMDB map size for these record sizes (:func:`map_bytes`, :func:`map_size_for`)."""
    return map_size_for(map_bytes(sizes))


def check_record_format(layout: EntryLayout, parquet_dir: Path) -> None:
    """StoreBuildError unless ``layout`` (of ``parquet_dir``) is of the record format the builds write: a legacy
    layout is read-only."""
    if layout.record_format != ENTRY_FORMAT_VERSION:
        raise StoreBuildError(f"{parquet_dir}: a layout of record format {layout.record_format} is read-only; the "
                              f"prefill writes format {ENTRY_FORMAT_VERSION}")


def check_part_schema(path: Path, schema: pa.Schema) -> None:
    """StoreBuildError naming ``path`` unless ``schema`` has every prefill column with its type."""
    for name, types in _COLUMNS.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise StoreBuildError(f"{path}: missing column {name!r} (the prefill Parquet has columns "
                                  f"{list(_COLUMNS)}; columns here: {schema.names})")
        if schema.field(idx).type not in types:
            raise StoreBuildError(f"{path}: column {name!r} has type {schema.field(idx).type}, "
                                  f"expected {' or '.join(map(str, types))}")


@dataclass
class _Scan:
    files: list[Path]
    ids: np.ndarray  # int64, global row order (file by file, row by row)
    lengths: np.ndarray
    file_of: np.ndarray  # file index of each global row
    order: np.ndarray  # argsort of ids
    file_order: list[int] | None  # files in key order when streaming is possible, else None


def _scan(layout: EntryLayout, files: list[Path]) -> _Scan:
    """Pass 1: user_id and length of every row; validation; the sorted order."""
    ids, lens, file_of, ranges, all_sorted = [], [], [], [], True
    for i, path in enumerate(files):
        pf = pq.ParquetFile(path, pre_buffer=False)
        check_part_schema(path, pf.schema_arrow)
        batches = list(pf.iter_batches(columns=["user_id", "length"], batch_size=1 << 16))
        for name in ("user_id", "length"):
            if any(b.column(name).null_count for b in batches):
                raise StoreBuildError(f"{path}: null values in column {name!r}")
        fid = np.concatenate([b.column("user_id").to_numpy() for b in batches] or [np.zeros(0, np.int64)])
        ln = np.concatenate([b.column("length").to_numpy() for b in batches] or [np.zeros(0, np.int32)])
        ids.append(fid.astype(np.int64))
        lens.append(ln.astype(np.int64))
        file_of.append(np.full(len(fid), i, np.int32))
        if len(fid):
            all_sorted &= bool(np.all(fid[1:] > fid[:-1]))
            ranges.append((int(fid[0]), int(fid[-1]), i))
    cat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    fo = np.concatenate(file_of) if file_of else np.zeros(0, np.int32)
    neg = np.flatnonzero(cat < 0)
    if neg.size:
        raise RecordError(f"negative user id in {files[fo[neg[0]]].name}; keys are unsigned 8-byte "
                          "big-endian, user ids must be >= 0", int(cat[neg[0]]))
    bad = np.flatnonzero((lengths < 0) | (lengths > layout.max_len))
    if bad.size:
        raise RecordError(f"length {int(lengths[bad[0]])} outside 0..max_len={layout.max_len}",
                          int(cat[bad[0]]))
    order = np.argsort(cat, kind="stable")
    srt = cat[order]
    dup = np.flatnonzero(srt[1:] == srt[:-1])
    if dup.size:
        a, b = order[dup[0]], order[dup[0] + 1]
        raise StoreBuildError(f"duplicate user id {int(srt[dup[0]])}: rows in {files[fo[a]].name} "
                              f"and {files[fo[b]].name}")
    ranges.sort()
    disjoint = all(ranges[j][1] < ranges[j + 1][0] for j in range(len(ranges) - 1))
    file_order = [r[2] for r in ranges] if (all_sorted and disjoint) else None
    return _Scan(files, cat, lengths, fo, order, file_order)


def iter_file_records(path: Path, layout: EntryLayout, batch_size: int) -> Iterator[tuple[int, bytes]]:
    """Pass 2: (user_id, record bytes) for every row of one file, in file order, verified."""
    pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering keeps what it read: memory grew with the file
    names = list(_COLUMNS)
    for batch in pf.iter_batches(columns=names, batch_size=batch_size):
        cols = {name: batch.column(name) for name in names}
        uids = cols["user_id"].to_numpy().tolist()
        for name, col in cols.items():
            if col.null_count:
                j = next(j for j, v in enumerate(col.is_null().to_pylist()) if v)
                raise RecordError(f"{path.name}: null {name!r}", uids[j])
        lengths, checks = cols["length"].to_numpy().tolist(), cols["checksum"].to_numpy().tolist()
        mvs = cols["model_version"].to_pylist()
        payloads = cols["payload"].to_pylist()
        for j, uid in enumerate(uids):
            yield uid, entry_from_parquet_row(layout, user_id=uid, length=lengths[j], payload=payloads[j],
                                              model_version=mvs[j], checksum=checks[j])


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    """A progress bar on stderr (disabled: a no-op object with the same methods)."""
    return tqdm(total=total, desc=desc, unit="user", unit_scale=True, disable=not enabled, file=sys.stderr)


def _counted(items: Iterator[T], bar: tqdm) -> Iterator[T]:
    """Pass items through, advancing `bar` every 16384 items and at the end."""
    n = 0
    for item in items:
        yield item
        n += 1
        if n & 0x3FFF == 0:
            bar.update(0x4000)
    bar.update(n & 0x3FFF)


def _chunks(items: Iterator[tuple[bytes, bytes]], limit: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """Consecutive lists of pairs holding at most ``limit`` value bytes each (at least one pair)."""
    chunk: list[tuple[bytes, bytes]] = []
    size = 0
    for pair in items:
        chunk.append(pair)
        size += len(pair[1])
        if size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def load_sorted(out_dir: Path, items: Callable[[], Iterator[tuple[bytes, bytes]]], n: int, map_size: int,
                txn_bytes: int | None = None) -> tuple[int, int]:
    """Sorted (key, value) pairs with append=True, in write transactions of at most ``txn_bytes`` (default
    :data:`TXN_BYTES`) of values (one for a smaller store); on MapFullError the open chunk is redone after the
    map doubled. Returns (map size, map retries)."""
    env = lmdb.open(str(out_dir), subdir=True, map_size=map_size, readahead=False, meminit=False,
                    max_dbs=0, sync=False, metasync=False)
    retries = total = 0
    try:
        for chunk in _chunks(items(), txn_bytes or TXN_BYTES) if n else iter([[]]):
            while True:
                try:
                    with env.begin(write=True) as txn:
                        consumed, added = txn.cursor().putmulti(chunk, append=True)
                        if consumed != len(chunk) or added != len(chunk):
                            raise StoreBuildError(f"LMDB load put {total + added}/{total + consumed} of {n} "
                                                  "records (keys not strictly increasing?)")
                    break
                except lmdb.MapFullError:
                    map_size *= 2
                    retries += 1
                    env.set_mapsize(map_size)  # no transaction is open here
            total += len(chunk)
        if total != n:
            raise StoreBuildError(f"LMDB load got {total} records, expected {n}")
        env.sync(True)
    finally:
        env.close()
    return map_size, retries


def build_lmdb(
    parquet_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    batch_size: int = 4096,
    map_size: int | None = None,
    tmp_dir: str | os.PathLike | None = None,
) -> BuildStats:
    """Build the LMDB store OUT_DIR from the prefill Parquet in PARQUET_DIR (see module doc).

    OUT_DIR must not exist or be empty; on any error it is removed again (nothing half-built stays).
    `map_size` overrides the estimate (tests); the spill file goes to `tmp_dir` (default: OUT_DIR's
    parent). Raises StoreBuildError / RecordError (both ValueError) naming the offending user.
    """
    t0 = time.perf_counter()
    parquet_dir, out_dir = Path(parquet_dir), Path(out_dir)
    layout = read_layout(parquet_dir / PARQUET_LAYOUT_FILE)
    check_record_format(layout, parquet_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StoreBuildError(f"{out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    need = 0
    try:
        scan = _scan(layout, list_parquet_files(parquet_dir))
        n = len(scan.ids)
        sizes = layout.record_sizes(scan.lengths)
        need = int(sizes.sum())
        size = map_size or estimate_map_size(sizes)
        with tempfile.TemporaryDirectory(prefix=".ckv-spill-", dir=tmp_dir or out_dir.parent) as tmp:
            if scan.file_order is not None:
                def items() -> Iterator[tuple[bytes, bytes]]:
                    bar = _progress(n, "load", progress)
                    for i in scan.file_order:
                        for uid, rec in _counted(iter_file_records(scan.files[i], layout, batch_size), bar):
                            yield user_key(uid), rec
                    bar.close()

                size, retries = load_sorted(out_dir, items, n, size)
            else:
                size, retries = _load_via_spill(scan, layout, sizes, Path(tmp), out_dir, size,
                                                batch_size, progress)
        data = (out_dir / "data.mdb").stat()
    except BaseException as exc:
        full = _disk_full_message(exc, out_dir, need, tmp_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        if full:
            raise StoreBuildError(full) from exc
        raise
    return BuildStats(
        layout=layout, users=n, empty_users=int((scan.lengths == 0).sum()),
        behaviours=int(scan.lengths.sum()), payload_bytes=int(sizes.sum()) - HEADER_SIZE * n,
        record_bytes=int(sizes.sum()), file_bytes=data.st_size, disk_bytes=data.st_blocks * 512,
        map_size=size, map_retries=retries, sorted_input=scan.file_order is not None,
        seconds=time.perf_counter() - t0, part_rows=part_rows(layout, scan.lengths))


def part_rows(layout: EntryLayout, lengths: np.ndarray) -> dict[str, int]:
    """Rows stored per part over all users (parts are capped: Σ min(n, cap))."""
    n = lengths.astype(np.int64)
    return {p.name: int(np.minimum(n, p.cap).sum()) for p in layout.parts}


_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FULL_TEXT = ("No space left", "File too large", "quota exceeded", "Input/output error")


def _disk_full_message(exc: BaseException, out_dir: Path, need: int, tmp_dir: object) -> str | None:
    """A clear message if `exc` is the filesystem running out of space (ENOSPC / EFBIG / EDQUOT; LMDB
    reports a failed write of its commit as EIO), else None."""
    if isinstance(exc, OSError):
        if exc.errno not in _FULL_ERRNOS:
            return None
    elif not (isinstance(exc, lmdb.Error) and any(t.lower() in str(exc).lower() for t in _FULL_TEXT)):
        return None
    try:
        free = shutil.disk_usage(out_dir if out_dir.exists() else out_dir.parent).free
    except OSError:
        free = -1
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    capped = fsize != resource.RLIM_INFINITY and fsize < need + (8 << 20)
    if isinstance(exc, lmdb.Error) and "Input/output" in str(exc) and free >= 2 * need + (8 << 20) and not capped:
        return None  # a real I/O error, not a full disk
    if capped:
        free = min(free, fsize)
    spill = f" (and the spill file in {tmp_dir or out_dir.parent})"
    what = "the file size limit (RLIMIT_FSIZE)" if capped else "no space left on the device"
    return (f"{what}: cannot build the LMDB store in {out_dir}{spill}: {exc}; the records "
            f"need about {need / 1e6:.1f} MB, {max(free, 0) / 1e6:.1f} MB are free there. Free space or put "
            "STORE on a larger filesystem and re-run; the partial build was removed, nothing was published "
            "and the current store version is unchanged")


def _load_via_spill(scan: _Scan, layout: EntryLayout, sizes: np.ndarray, tmp: Path, out_dir: Path,
                    map_size: int, batch_size: int, progress: bool) -> tuple[int, int]:
    """Pass 2: encode in file order into a spill file; pass 3: load from it in key order."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    spill = tmp / "records.bin"
    bar = _progress(len(scan.ids), "encode", progress)
    g = 0
    with open(spill, "wb", buffering=1 << 20) as fh:
        for path in scan.files:
            for uid, rec in _counted(iter_file_records(path, layout, batch_size), bar):
                if uid != scan.ids[g] or len(rec) != sizes[g]:
                    raise StoreBuildError(f"{path.name} changed during the build (user {uid})")
                fh.write(rec)
                g += 1
    bar.close()
    if g != len(scan.ids):
        raise StoreBuildError(f"Parquet input changed during the build ({g} rows, expected {len(scan.ids)})")
    with open(spill, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] else b""

        def items() -> Iterator[tuple[bytes, bytes]]:
            bar = _progress(len(scan.ids), "load", progress)
            order, ids, offs = scan.order.tolist(), scan.ids.tolist(), offsets.tolist()
            for g in _counted(iter(order), bar):
                yield user_key(ids[g]), mm[offs[g]:offs[g + 1]]
            bar.close()

        try:
            return load_sorted(out_dir, items, len(scan.ids), map_size)
        finally:
            if isinstance(mm, mmap.mmap):
                mm.close()
