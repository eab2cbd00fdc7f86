"""LMDB's page model: the pages and bytes of an LMDB holding given values, put in key order with MDB_APPEND
(the store builder's way), so the capacity plan (:mod:`pipeline.reports.capacity`) predicts data.mdb's size."""

from __future__ import annotations

import math

import numpy as np

LMDB_PAGE = 4096
LMDB_PAGE_HEADER = 16  # PAGEHDRSZ
LMDB_NODE_HEADER = 8  # NODESIZE
LMDB_KEY = 8  # user id, 8-byte big-endian (cachestore.store.record.KEY)
LMDB_SLOT = 2  # indx_t per node in the page's pointer array
LMDB_META_PAGES = 2
LMDB_BRANCH_NODE = LMDB_NODE_HEADER + LMDB_KEY + LMDB_SLOT  # 18 B per child pointer

def lmdb_node_max(page: int = LMDB_PAGE) -> int:
    """LMDB's me_nodemax: the largest leaf node kept inline (2,038 B at 4 KiB pages)."""
    return (((page - LMDB_PAGE_HEADER) // 2) & ~1) - 2


def lmdb_pages(record_sizes: np.ndarray, page: int = LMDB_PAGE) -> dict[str, int]:
    """Pages of an LMDB holding these values, put in this (sorted-key) order with MDB_APPEND.

    Exact for the store builder (docs/capacity.md checks it against data.mdb): leaf nodes of
    ``even(8 + 8 + size)`` + a 2-byte slot packed greedily into ``page − 16`` bytes; a value whose
    node exceeds :func:`lmdb_node_max` takes ``ceil((16 + size) / page)`` overflow pages and an
    inline node of 8 + 8 + 8 (page number) bytes; branch levels of 18 B per child; 2 meta pages.
    """
    sizes = np.asarray(record_sizes, dtype=np.int64)
    usable = page - LMDB_PAGE_HEADER
    node = LMDB_NODE_HEADER + LMDB_KEY + sizes
    node += node & 1
    big = node > lmdb_node_max(page)
    node = np.where(big, LMDB_NODE_HEADER + LMDB_KEY + 8, node) + LMDB_SLOT
    overflow = int((-(-(LMDB_PAGE_HEADER + sizes[big]) // page)).sum())
    cs = np.concatenate([[0], np.cumsum(node)])
    leaf, i, n = 0, 0, len(sizes)
    while i < n:  # greedy fill, one page per iteration
        i = int(np.searchsorted(cs, cs[i] + usable, side="right")) - 1
        leaf += 1
    return {"leaf": leaf, "branch": branch_pages(leaf, page), "overflow": overflow, "meta": LMDB_META_PAGES}


def branch_pages(leaf: float, page: int = LMDB_PAGE) -> int:
    fanout = (page - LMDB_PAGE_HEADER) // LMDB_BRANCH_NODE
    total, level = 0, math.ceil(leaf)
    while level > 1:
        level = -(-level // fanout)
        total += level
    return total


def lmdb_bytes(record_sizes: np.ndarray, page: int = LMDB_PAGE) -> int:
    """data.mdb's size (= allocated bytes) for these records in key order (:func:`lmdb_pages`)."""
    return sum(lmdb_pages(record_sizes, page).values()) * page
