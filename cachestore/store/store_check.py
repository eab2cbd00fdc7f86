"""Checks of a store version's LMDB file before it is mapped (torch-free, no mmap, no ``lmdb``).

LMDB maps ``data.mdb`` and trusts it: a truncated file kills the reader with SIGBUS the first time
a page past the end is touched, a damaged page surfaces as a raw ``lmdb.*Error`` (or, for a damaged
node size, as a read past the end of the file). So every reader checks the file first, with plain
``read()``s viewed by ``np.frombuffer``:

:func:`check_version` (cheap, at every open; two page reads and a stat):
    - ``data.mdb`` has the byte size the manifest recorded (``lmdb.file_bytes``, or for manifests
      written before the ``lmdb`` block ``stats.file_bytes``);
    - both meta pages (pages 0 and 1) are LMDB meta pages: page number, P_META flag, magic
      0xBEEFC0DE, data version 1, one power-of-two page size; every page they name (last page, roots
      of the free and main B-trees) lies inside the file;
    - the newer meta page (higher txnid) agrees with the manifest's ``lmdb`` block (page size, last
      page, main root, txnid, entry count); old manifests: entry count against ``stats.users``.
:func:`cachestore.store.store_tree.check_tree` (full, for ``ckv store verify`` and ``ckv score`` with CRC checks;
reads every
    branch and leaf page, no record payload): every page reached from the main root has its own page
    number and the flags of its level, node pointers and sizes inside the page, 8-byte keys in strictly
    increasing order, overflow runs inside the file; the entry count, page counts and a CRC-32 of all
    keys in order (``keys_crc32``) must equal the meta page's and the manifest's. After it passes, no
    read of any value can leave the file.

Byte layout read here (LMDB 0.9, little-endian, 64-bit): page header 16 bytes ``pgno u64 | pad u16 |
flags u16 | lower u16 | upper u16`` (overflow pages: ``pages u32`` in place of lower/upper); a meta
page continues with ``magic u32 | version u32 | address u64 | mapsize u64 | free db | main db |
last_pg u64 | txnid u64``, each db 48 bytes ``pad(page size for the free db) u32 | flags u16 | depth u16
| branch | leaf | overflow | entries | root`` (u64 each). Node: ``lo u16 | hi u16 | flags u16 | ksize
u16 | key | data``; a branch node's child page is ``lo | hi << 16 | flags << 32``, a leaf node's data
size ``lo | hi << 16`` (F_BIGDATA: the data is the u64 number of its first overflow page).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
PAGE_HEADER = 16
P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA = 0x01
NO_PAGE = (1 << 64) - 1  # P_INVALID: the root of an empty B-tree
_DB = np.dtype([("pad", "<u4"), ("flags", "<u2"), ("depth", "<u2"), ("branch", "<u8"), ("leaf", "<u8"),
                ("overflow", "<u8"), ("entries", "<u8"), ("root", "<u8")])
_META = np.dtype([("pgno", "<u8"), ("pad", "<u2"), ("flags", "<u2"), ("lower", "<u2"), ("upper", "<u2"),
                  ("magic", "<u4"), ("version", "<u4"), ("address", "<u8"), ("mapsize", "<u8"),
                  ("free", _DB), ("main", _DB), ("last_pg", "<u8"), ("txnid", "<u8")])
_HEAD = np.dtype([("pgno", "<u8"), ("pad", "<u2"), ("flags", "<u2"), ("lower", "<u2"), ("upper", "<u2")])
_NODE = np.dtype([("lo", "<u2"), ("hi", "<u2"), ("flags", "<u2"), ("ksize", "<u2")])
DATA_FILE = "data.mdb"


class StoreDamagedError(ValueError):
    """A store version whose LMDB file cannot be trusted: one line naming the version directory, the
    user being read (if known), what is wrong, and what to do."""

    def __init__(self, version_dir: str | os.PathLike, problem: str, user_id: int | None = None) -> None:
        self.version_dir, self.problem, self.user_id = Path(version_dir), problem, user_id
        who = "" if user_id is None else f" (reading user {user_id})"
        super().__init__(f"store version {version_dir} is damaged{who}: {problem}; run `ckv store verify STORE` "
                         "for a full check and re-publish the store (`ckv store build STORE`, or a new prefill); "
                         "nothing was served from it")


@dataclass(frozen=True)
class LmdbMeta:
    """The newer of the two meta pages (what LMDB opens), as recorded in the manifest's ``lmdb`` block."""

    file_bytes: int
    magic: int
    version: int
    page_size: int
    last_page: int
    txnid: int
    main_root: int
    free_root: int
    depth: int
    entries: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int


def _read(fh, offset: int, n: int) -> bytes:
    fh.seek(offset)
    return fh.read(n)


def _meta_page(raw: bytes, i: int, size: int) -> np.void:
    """Meta page i (0 or 1) parsed and checked against the file size; ValueError naming what is wrong."""
    if len(raw) < _META.itemsize:
        raise ValueError(f"meta page {i} is cut off ({size} bytes in the file)")
    m = np.frombuffer(raw, _META, count=1)[0]
    if int(m["pgno"]) != i or not int(m["flags"]) & P_META:
        raise ValueError(f"page {i} is not an LMDB meta page (page number {int(m['pgno'])}, "
                         f"flags {int(m['flags']):#x})")
    if int(m["magic"]) != MAGIC or int(m["version"]) != DATA_VERSION:
        raise ValueError(f"meta page {i}: magic {int(m['magic']):#x} / version {int(m['version'])}, "
                         f"expected {MAGIC:#x} / {DATA_VERSION}")
    psize, last = int(m["free"]["pad"]), int(m["last_pg"])
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise ValueError(f"meta page {i}: page size {psize} is not a power of two in 512..65536")
    if (last + 1) * psize > size:
        raise ValueError(f"data.mdb has {size} bytes, but meta page {i} names pages up to {last} of {psize} bytes "
                         f"({(last + 1) * psize} bytes): the file was truncated")
    for name in ("main", "free"):
        root = int(m[name]["root"])
        if root != NO_PAGE and not 2 <= root <= last:
            raise ValueError(f"meta page {i}: {name} root page {root} outside pages 2..{last}")
    return m


def read_meta(path: str | os.PathLike) -> LmdbMeta:
    """Both meta pages of the LMDB file ``path`` checked; the newer one (ValueError if damaged)."""
    size = os.stat(path).st_size
    with open(path, "rb") as fh:
        m0 = _meta_page(_read(fh, 0, _META.itemsize), 0, size)
        psize = int(m0["free"]["pad"])
        m1 = _meta_page(_read(fh, psize, _META.itemsize), 1, size)
    if int(m1["free"]["pad"]) != psize:
        raise ValueError(f"the meta pages disagree on the page size ({psize}, {int(m1['free']['pad'])})")
    m = m0 if int(m0["txnid"]) >= int(m1["txnid"]) else m1
    main = m["main"]
    return LmdbMeta(file_bytes=size, magic=int(m["magic"]), version=int(m["version"]), page_size=psize,
                    last_page=int(m["last_pg"]), txnid=int(m["txnid"]), main_root=int(main["root"]),
                    free_root=int(m["free"]["root"]), depth=int(main["depth"]), entries=int(main["entries"]),
                    branch_pages=int(main["branch"]), leaf_pages=int(main["leaf"]),
                    overflow_pages=int(main["overflow"]))


def version_manifest(version_dir: Path) -> dict:
    """The version's manifest.json ({} when the directory has none, e.g. a bare staging build)."""
    try:
        with open(version_dir / "manifest.json", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreDamagedError(version_dir, f"unreadable manifest.json ({exc})") from None
    if not isinstance(data, dict):
        raise StoreDamagedError(version_dir, "manifest.json is not a JSON object")
    return data


def _compare(recorded: dict, meta: LmdbMeta) -> str | None:
    """The first fact of the manifest's ``lmdb`` block that the file's meta page contradicts, or None."""
    for key in ("magic", "version", "page_size", "last_page", "txnid", "main_root", "entries"):
        if key in recorded and recorded[key] != getattr(meta, key):
            return f"LMDB {key} is {getattr(meta, key)}, the manifest recorded {recorded[key]}"
    return None


def check_version(version_dir: str | os.PathLike, *, user_id: int | None = None) -> LmdbMeta:
    """The cheap check of a version's ``lmdb/data.mdb`` before it is mapped (module docstring);
    :class:`StoreDamagedError` on any disagreement. Returns the meta page LMDB will open."""
    vdir = Path(version_dir)
    path = vdir / "lmdb" / DATA_FILE
    manifest = version_manifest(vdir)
    recorded = manifest.get("lmdb") or {}
    stats = manifest.get("stats") or {}
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise StoreDamagedError(vdir, f"cannot read lmdb/{DATA_FILE} ({exc.strerror})", user_id) from None
    want = recorded.get("file_bytes", stats.get("file_bytes"))
    if want is not None and size != want:
        how = "truncated" if size < want else "extended or replaced"
        raise StoreDamagedError(vdir, f"lmdb/{DATA_FILE} has {size} bytes, the manifest recorded {want} "
                                f"(the file was {how})", user_id)
    try:
        meta = read_meta(path)
    except (ValueError, OSError) as exc:
        raise StoreDamagedError(vdir, f"lmdb/{DATA_FILE}: {exc}", user_id) from None
    problem = _compare(recorded, meta)
    if problem is None and "entries" not in recorded and "users" in stats and stats["users"] != meta.entries:
        problem = f"LMDB holds {meta.entries} records, the manifest recorded {stats['users']}"
    if problem is not None:
        raise StoreDamagedError(vdir, f"lmdb/{DATA_FILE}: {problem}", user_id)
    return meta


def keys_digest(keys: bytes, crc: int = 0) -> int:
    """CRC-32 continued over concatenated 8-byte keys (what ``keys_crc32`` records)."""
    return zlib.crc32(keys, crc)
