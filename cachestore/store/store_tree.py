"""A full walk of an LMDB file's main B-tree with plain file reads, and the checks built on it:
:func:`check_tree` (``ckv store verify``) and :func:`lmdb_facts` (the manifest's ``lmdb`` block).

Page and node layout: :mod:`cachestore.store.store_check`. Each page reached from the main root is read once
(``pread``, ``np.frombuffer``) and checked, all its nodes at once: its own page number, the flags of
its level (branch above, leaf at depth ``meta.depth``), ``16 <= lower <= upper <= page size``, node
pointers even and inside ``[upper, page size)``, each node (header, key, inline data or overflow page
number) inside the page, keys of 8 bytes (a branch page's first key may be empty), child pages and
overflow runs inside the file and not seen twice. Keys must come out in strictly increasing order
over the whole walk; the counts of entries, branch, leaf and overflow pages must equal the meta
page's. No record payload is read: after the walk, every value lies inside the file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from collectivekv.cachestore.store.store_check import (
    DATA_FILE,
    F_BIGDATA,
    NO_PAGE,
    P_BRANCH,
    P_LEAF,
    PAGE_HEADER,
    LmdbMeta,
    StoreDamagedError,
    check_version,
    keys_digest,
    read_meta,
    version_manifest,
)

_LEAF_FLAGS = (0, F_BIGDATA)  # no sub-databases, no duplicate keys in a store


@dataclass(frozen=True)
class TreeFacts:
    """What a walk found: entries, pages per kind and the CRC-32 of all keys in order."""

    entries: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    keys_crc32: int


class _Walk:
    """State of one walk (the file, the meta page, pages seen, the last key)."""

    def __init__(self, fd: int, meta: LmdbMeta) -> None:
        self.fd, self.meta, self.psize = fd, meta, meta.page_size
        self.seen: set[int] = set()
        self.last_key = -1
        self.crc = 0
        self.counts = {"entries": 0, "branch": 0, "leaf": 0, "overflow": 0}

    def page(self, pgno: int, flag: int) -> tuple[np.ndarray, np.ndarray]:
        """(page bytes as uint8, node offsets) of page pgno, checked as the module docstring says."""
        if not 2 <= pgno <= self.meta.last_page or pgno in self.seen:
            raise ValueError(f"page {pgno} is outside pages 2..{self.meta.last_page} or reached twice")
        self.seen.add(pgno)
        raw = os.pread(self.fd, self.psize, pgno * self.psize)
        if len(raw) != self.psize:
            raise ValueError(f"page {pgno} is cut off")
        u8 = np.frombuffer(raw, np.uint8)
        head_pgno, flags = int(u8[:8].view("<u8")[0]), int(u8[10:12].view("<u2")[0])
        lower, upper = (int(x) for x in u8[12:16].view("<u2"))
        if head_pgno != pgno or flags & (P_BRANCH | P_LEAF) != flag:
            raise ValueError(f"page {pgno}: header says page {head_pgno}, flags {flags:#x} (expected a "
                             f"{'branch' if flag == P_BRANCH else 'leaf'} page)")
        if not PAGE_HEADER < lower <= upper <= self.psize:
            raise ValueError(f"page {pgno}: free space bounds {lower}..{upper} outside {PAGE_HEADER}..{self.psize}")
        ptrs = u8[PAGE_HEADER:lower].view("<u2").astype(np.int64)
        if (ptrs < upper).any() or (ptrs > self.psize - 8).any() or (ptrs & 1).any():
            raise ValueError(f"page {pgno}: a node pointer outside {upper}..{self.psize - 8}")
        return u8, ptrs

    def nodes(self, u8: np.ndarray, ptrs: np.ndarray) -> tuple[np.ndarray, ...]:
        """(lo | hi << 16, flags, key size) of every node of a page, int64 each."""
        words = u8[ptrs[:, None] + np.arange(8)].view("<u2").astype(np.int64)  # (N, 4)
        return words[:, 0] | (words[:, 1] << 16), words[:, 2], words[:, 3]

    def keys(self, pgno: int, u8: np.ndarray, at: np.ndarray) -> None:
        """Check that the 8-byte big-endian keys at offsets ``at`` continue strictly increasing."""
        if not len(at):
            return
        keys = u8[at[:, None] + np.arange(8)].view(">u8")[:, 0]
        if (keys[1:] <= keys[:-1]).any() or int(keys[0]) <= self.last_key:
            raise ValueError(f"page {pgno}: keys out of order")
        self.last_key = int(keys[-1])

    def leaf(self, pgno: int) -> None:
        u8, ptrs = self.page(pgno, P_LEAF)
        self.counts["leaf"] += 1
        size, flags, ksize = self.nodes(u8, ptrs)
        big = flags == F_BIGDATA
        if not np.isin(flags, _LEAF_FLAGS).all() or (ksize != 8).any():
            raise ValueError(f"page {pgno}: a leaf node with flags outside {_LEAF_FLAGS} or a key of other "
                             "than 8 bytes")
        ends = ptrs + 16 + np.where(big, 8, size)
        if (ends > self.psize).any():
            raise ValueError(f"page {pgno}: a leaf node runs past the end of its page")
        self.keys(pgno, u8, ptrs + 8)
        self.crc = keys_digest(u8[(ptrs + 8)[:, None] + np.arange(8)].tobytes(), self.crc)
        self.counts["entries"] += len(ptrs)
        if big.any():
            first = u8[(ptrs[big] + 16)[:, None] + np.arange(8)].view("<u8")[:, 0].astype(np.int64)
            pages = -(-(size[big] + PAGE_HEADER) // self.psize)
            if (first < 2).any() or (first + pages - 1 > self.meta.last_page).any():
                raise ValueError(f"page {pgno}: a record's overflow pages lie outside pages 2..{self.meta.last_page}")
            self.counts["overflow"] += int(pages.sum())

    def branch(self, pgno: int, depth: int) -> None:
        u8, ptrs = self.page(pgno, P_BRANCH)
        self.counts["branch"] += 1
        child_lo, flags, ksize = self.nodes(u8, ptrs)
        child = child_lo | (flags << 32)
        if (ksize[1:] != 8).any() or ksize[0] not in (0, 8) or (ptrs + 8 + ksize > self.psize).any():
            raise ValueError(f"page {pgno}: a branch node with a key of other than 8 bytes")
        for c in child.tolist():
            self.visit(c, depth + 1)

    def visit(self, pgno: int, depth: int) -> None:
        if depth > self.meta.depth or depth > 64:
            raise ValueError(f"page {pgno} lies deeper than the tree's depth {self.meta.depth}")
        if depth == self.meta.depth:
            self.leaf(pgno)
        else:
            self.branch(pgno, depth)


def walk_tree(path: str | os.PathLike, meta: LmdbMeta) -> TreeFacts:
    """Walk the main B-tree of the LMDB file ``path`` whose newer meta page is ``meta``; ValueError
    naming the first page that is wrong (module docstring)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        walk = _Walk(fd, meta)
        if meta.main_root != NO_PAGE:
            walk.visit(meta.main_root, 1)
        elif meta.entries or meta.depth:
            raise ValueError(f"an empty tree with {meta.entries} entries and depth {meta.depth}")
    finally:
        os.close(fd)
    c = walk.counts
    found = (c["entries"], c["branch"], c["leaf"], c["overflow"])
    want = (meta.entries, meta.branch_pages, meta.leaf_pages, meta.overflow_pages)
    if found != want:
        raise ValueError(f"the tree holds (entries, branch, leaf, overflow pages) = {found}, the meta page says {want}")
    return TreeFacts(*found, keys_crc32=walk.crc)


__all__ = ["DATA_FILE", "TreeFacts", "walk_tree"]


def lmdb_facts(lmdb_dir: str | os.PathLike) -> dict:
    """The manifest's ``lmdb`` block of a freshly built LMDB directory: its newer meta page
    (:class:`LmdbMeta`) and ``keys_crc32`` from a full :func:`check_tree` walk."""
    path = Path(lmdb_dir) / DATA_FILE
    meta = read_meta(path)
    return {**asdict(meta), "keys_crc32": walk_tree(path, meta).keys_crc32}


def check_tree(version_dir: str | os.PathLike) -> LmdbMeta:
    """:func:`check_version`, then a walk of every branch and leaf page (module docstring);
    :class:`StoreDamagedError` naming the first bad page."""
    vdir = Path(version_dir)
    meta = check_version(vdir)
    recorded = version_manifest(vdir).get("lmdb") or {}
    try:
        tree = walk_tree(vdir / "lmdb" / DATA_FILE, meta)
    except ValueError as exc:
        raise StoreDamagedError(vdir, f"lmdb/{DATA_FILE}: {exc}") from None
    if "keys_crc32" in recorded and recorded["keys_crc32"] != tree.keys_crc32:
        raise StoreDamagedError(vdir, f"lmdb/{DATA_FILE}: the user ids stored (CRC-32 {tree.keys_crc32:#010x}) are "
                                f"not the ones published (CRC-32 {recorded['keys_crc32']:#010x})")
    return meta
