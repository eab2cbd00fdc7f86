"""Incremental prefill: recompute only the users whose history changed since the previous store.

History fingerprint (``HISTORY_FP_VERSION`` 1, column ``history_fp`` int64 of the prefill Parquet,
written by every prefill since ``prefill_parquet_schema_version`` 2)::

    xxhash64(size(items), window(items), window(labels))   # Spark's xxhash64, seed 42
    window(x) = the last max_len elements of x (items cast to int, labels to tinyint)

i.e. exactly what the model reads (the last ``max_len`` events, their labels) plus the total history
length (so any appended event changes it, even when the window looks the same). It is computed by
Spark SQL on the executors; nothing is collected to the driver.

Plan (``--incremental --previous STORE``): the previous store's current version is reusable when
its manifest has the same model version, mode, kv dtype, max_len and fingerprint version, and its
Parquet has ``history_fp``; otherwise the job does a full prefill (the reason is logged and
recorded in the manifest). With a reusable previous version:

- changed = new histories LEFT JOIN previous (user_id, history_fp) WHERE no previous row or the
  fingerprints differ  -> the normal prefill (``mapInArrow``);
- carried = previous rows INNER JOIN new (user_id, history_fp) WHERE the fingerprints are equal
  -> the previous Parquet rows, unchanged;
- users in the previous store but absent from the new histories are dropped (the store always holds
  exactly the users of the histories, like a full prefill).

Layout-agnostic: ``max_len`` is the layout's (a zoo store's: the model's ``window_len``) and the
carried rows are the store's prefill Parquet rows (one ``payload`` each; ``split``'s ``columns``); a
previous store of another layout (mode, kv dtype, window, parts, record format) is not reused.

The union is written and built/published like a full run, so the LMDB values equal a full prefill's
on the same inputs (records are deterministic: docs/prefill.md "Determinism"; with the ``direct``
and ``zoo`` engines bits can depend on chunk composition, so equality there is within verify's tolerance).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collectivekv.cachestore.store.entry import EntryLayout
from collectivekv.cachestore.store.lmdb_build import list_parquet_files
from collectivekv.cachestore.store.publish import CURRENT, MANIFEST, PublishError, open_current

log = logging.getLogger("ckv.prefill")
HISTORY_FP_VERSION = 1
FP_COL = "history_fp"
PREV_FP_COL = "prev_history_fp"


def fingerprint_sql(max_len: int, timestamps: bool = False) -> str:
    """Spark SQL expression of the history fingerprint (on columns items ARRAY<INT>, labels ARRAY<TINYINT>; with
    ``timestamps`` (a model with per-event features) also the window's timestamps ARRAY<BIGINT> and the one
    before it, which the first event's gap reads)."""
    start = f"greatest(size(items) - {int(max_len)} + 1, 1)"
    parts = [f"size(items), slice(items, {start}, {int(max_len)})", f"slice(labels, {start}, {int(max_len)})"]
    if timestamps:
        before = f"greatest(size(items) - {int(max_len)}, 1)"
        parts.append(f"slice(timestamps, {before}, {int(max_len) + 1})")
    return f"xxhash64({', '.join(parts)})"


@dataclass(frozen=True)
class Previous:
    """The previous store version an incremental run may reuse (parquet None: full prefill, see reason)."""

    store: str
    version_id: str | None
    parquet: Path | None
    users: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "version_id": self.version_id, "reusable": self.parquet is not None,
                "users": self.users, "reason": self.reason}


def previous_state(store: str | os.PathLike, model_version: str, layout: EntryLayout) -> Previous:
    """Resolve STORE/current once and decide whether its rows can be carried over."""
    root = Path(store)
    cur = root / CURRENT
    if not cur.is_symlink() and not cur.is_dir():
        return Previous(str(store), None, None, 0, "no previous store (no current version)")
    try:  # the link as every reader checks it: versions/<id> inside the store, nothing else followed
        vdir = open_current(root)
    except (OSError, PublishError) as exc:
        return Previous(str(store), None, None, 0, f"previous version unreadable: {exc}")
    try:
        with open(vdir / MANIFEST, encoding="utf-8") as fh:
            man = json.load(fh)
    except OSError as exc:
        return Previous(str(store), None, None, 0, f"previous manifest unreadable: {exc}")
    vid, users = man.get("version_id"), int(man.get("users") or 0)
    prev_layout = man.get("layout") or {}
    inc = (man.get("prefill") or {}).get("incremental") or {}
    checks = [
        (man.get("model_version") == model_version,
         f"model version changed ({man.get('model_version')} -> {model_version}): full prefill"),
        (prev_layout == layout.to_dict(), "cache layout (mode / kv dtype / max_len / parts / record format) changed"),
        (inc.get("history_fp_version", HISTORY_FP_VERSION) == HISTORY_FP_VERSION, "fingerprint version changed"),
        (_has_fingerprints(vdir / "parquet"), "previous Parquet has no history fingerprints"),
    ]
    for ok, reason in checks:
        if not ok:
            return Previous(str(store), vid, None, users, reason)
    return Previous(str(store), vid, vdir / "parquet", users, "same model version and layout: incremental")


def _has_fingerprints(parquet: Path) -> bool:
    """Every part file of a version's Parquet has the history_fp column (a store rebuilt with `ckv store build`
    from Parquet written without it has none, whatever its manifest says)."""
    import pyarrow.parquet as pq

    files = list_parquet_files(parquet) if parquet.is_dir() else []
    return bool(files) and all(FP_COL in pq.read_schema(f).names for f in files)


def split(spark: Any, new: Any, prev_parquet: Path, columns: list[str] | None = None) -> tuple[Any, Any]:
    """(changed, carried): the new histories to prefill (user_id, items, labels, history_fp,
    prev_history_fp) and the previous rows to carry over (the prefill Parquet ``columns`` + history_fp;
    default: ``pipeline.prefill.prefill.OUTPUT_SCHEMA.names``)."""
    from pyspark.sql import functions as F

    from collectivekv.pipeline.prefill.prefill import OUTPUT_SCHEMA

    if columns is None:
        columns = OUTPUT_SCHEMA.names
    prev = spark.read.parquet(prev_parquet.resolve().as_uri())
    prev_fp = prev.select("user_id", F.col(FP_COL).alias(PREV_FP_COL))
    changed = (new.join(prev_fp, "user_id", "left")
               .where(F.col(PREV_FP_COL).isNull() | (F.col(PREV_FP_COL) != F.col(FP_COL))))
    cols = [*columns, FP_COL]
    carried = (prev.join(new.select("user_id", F.col(FP_COL).alias("new_fp")), "user_id", "inner")
               .where(F.col("new_fp") == F.col(FP_COL)).select(*cols))
    return changed, carried
