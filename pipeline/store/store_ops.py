"""Build, describe and publish a cache store from prefill Parquet (`ckv store build`; the prefill job
calls :func:`build_store` at its end).

On top of ``cachestore.store.publish`` (staging -> versions/<id> -> atomic switch of ``current``) this adds:

- the manifest fields the prefill issue asks for (model version, dims, dtypes, pool size, user count,
  bytes of Parquet / LMDB on disk / payload, created-at, the command line, the prefill run's details),
  written into the staging version before it is published;
- ``_prefill.json`` (prefill metadata: model config, checkpoint, run stats) kept beside
  ``_layout.json`` in every version's ``parquet/`` so a standalone rebuild keeps it;
- stable symlinks ``STORE/{parquet,lmdb,shards,manifest.json,layout.json} -> current/<name>`` (``lmdb`` resolves in
  an unsharded version, ``shards`` in a sharded one): the paths the
  issue names resolve to the published version (through ``current``, so they switch with it).
  Programs should still resolve ``current`` once (``StoreReader.open_current``) and use that version.

:func:`publish_staged` is the one publish transaction (``ckv store build`` and ``ckv refresh`` both
use it): complete the staging version, write its manifest, switch ``current``; any failure removes
the staging version and leaves ``current`` as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectivekv.cachestore.store.entry import layout_from_dict
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, list_parquet_files
from collectivekv.cachestore.store.publish import (
    CURRENT,
    LAYOUT,
    LMDB_DIR,
    MANIFEST,
    PublishResult,
    build_version,
    new_staging_dir,
    open_current,
    publish,
)
from collectivekv.cachestore.store.record import HEADER_SIZE, write_layout
from collectivekv.cachestore.store.shards import SHARDS_DIR

log = logging.getLogger("ckv.store")
PREFILL_META_FILE = "_prefill.json"
PARQUET_DIR = "parquet"
CHECKPOINT_DIR = "checkpoint"  # inside a store version: the model the records were built with
PREFILL_PARQUET_SCHEMA_VERSION = 3  # the prefill Parquet columns (docs/prefill.md); bump on any change
# 2: + history_fp int64 (pipeline/prefill/incremental.py; ignored by the LMDB build, the record format is unchanged)
# 3: one payload column for every arch (din included: cachestore.store.entry.entry_schema)
STABLE_LINKS = (PARQUET_DIR, LMDB_DIR, SHARDS_DIR, MANIFEST, LAYOUT)  # lmdb: unsharded versions; shards: sharded ones


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + fsync + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_prefill_meta(parquet_dir: Path) -> dict[str, Any] | None:
    path = parquet_dir / PREFILL_META_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def summary_fields(manifest: dict, prefill: dict | None, command_line: str) -> dict[str, Any]:
    """The top-level manifest fields of a store version (see docs/prefill.md): the arch, mode, window,
    per-part widths (``dims.parts``), dtypes, shared sides and pool size."""
    stats = manifest["stats"]
    model = (prefill or {}).get("model_config") or {}
    users = stats["users"]
    d_user = (model.get("collective") or {}).get("d_user")
    entry = layout_from_dict(manifest["layout"])
    widths = {p.name: p.width for p in entry.parts}
    kv_widths = [p.width for p in entry.parts if p.kind == "kv"]
    d_attn = model.get("d_attn", kv_widths[0] if entry.mode == "full" and kv_widths else None)
    head: dict[str, Any] = {
        "model_version": entry.model_version, "arch": entry.arch, "mode": entry.mode,
        "dims": {"d_attn": d_attn, "max_len": entry.max_len,
                 "d_user": d_user if entry.mode == "collective" else None, "parts": widths},
        "dtypes": {"kv": entry.kv_dtype, "index": entry.idx_dtype},
        "k_shared": any(g.k_shared for g in entry.groups), "v_shared": any(g.v_shared for g in entry.groups),
        "pool_size": entry.pool_size,
        # how a raw user / item id becomes its key (cachestore/store/user_keys.py); older prefills: "int"
        "user_key": (prefill or {}).get("user_key", "int"), "item_key": (prefill or {}).get("item_key", "int"),
    }  # fmt: skip
    return {
        **head,
        # the Parquet's own schema version (its prefill meta): a store rebuilt from older Parquet keeps the older
        # number; None when the Parquet came without a prefill meta
        "prefill_parquet_schema_version": (prefill or {}).get("prefill_parquet_schema_version"),
        "users": users,
        "behaviours": stats["behaviours"],
        "bytes": {
            "parquet": sum(f["bytes"] for f in manifest["parquet"]["files"] if f["name"] != PARQUET_LAYOUT_FILE),
            "lmdb_file": stats["file_bytes"],
            "lmdb_disk": stats["disk_bytes"],
            "payload": stats["payload_bytes"],
            "records": stats["record_bytes"],
            "record_headers": HEADER_SIZE * users,
        },
        "created_at": manifest["created_utc"],
        "command_line": command_line,
        "prefill": prefill,
    }


def store_checkpoint(store: str | os.PathLike) -> Path | None:
    """The checkpoint published with STORE's current version (``checkpoint/``, by ``ckv refresh``), or None."""
    root = Path(store)
    if not os.path.lexists(root / CURRENT):
        return None
    ckpt = open_current(root) / CHECKPOINT_DIR
    return ckpt if ckpt.is_dir() else None


def attach_checkpoint(staging: Path, checkpoint: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Copy ``checkpoint`` into the version being assembled as ``checkpoint/`` and record it in ``manifest``: store
    and model are published together. ValueError when its model is not the records' (``manifest["model_version"]``)."""
    from collectivekv.cachestore.checkpoint import load_checkpoint

    shutil.copytree(checkpoint, staging / CHECKPOINT_DIR)
    ck = load_checkpoint(staging / CHECKPOINT_DIR)  # the copy is complete and is the store's model
    if ck.model_version != manifest["model_version"]:
        raise ValueError(f"checkpoint {ck.model_version} != store model {manifest['model_version']}")
    manifest["checkpoint"] = {"dir": CHECKPOINT_DIR, "model_version": ck.model_version,
                              "source": str(Path(checkpoint).resolve())}


def ensure_links(store_root: Path) -> None:
    """Create the stable ``STORE/<name> -> current/<name>`` symlinks (idempotent, atomic each). A name that holds
    anything else (a directory, a file, a link elsewhere: the user's) is left as it is, with a warning."""
    for name in STABLE_LINKS:
        link, target = store_root / name, f"{CURRENT}/{name}"
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if os.path.lexists(link):
            log.warning("%s exists and is not the link to %s: left as is (the published data is under %s/)",
                        link, target, CURRENT)
            continue
        tmp = store_root / f".{name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)


def publish_staged(store_root: Path, staging: Path, complete: Callable[[Path], dict[str, Any]],
                   **publish_options: Any) -> tuple[dict[str, Any], PublishResult]:
    """Publish the version being assembled in ``staging`` (a directory under ``store_root/staging``).

    ``complete(staging)`` finishes the version (files, checks) and returns its manifest, which is written
    to ``staging/manifest.json``; then ``cachestore.store.publish.publish`` moves it to ``versions/<id>`` and
    switches ``current``, and the stable links are ensured. Any failure (``complete``'s included, and
    KeyboardInterrupt) removes ``staging`` and leaves ``current`` as it was. Returns (manifest, result).
    """
    try:
        manifest = complete(staging)
        write_json(staging / MANIFEST, manifest)
        result = publish(store_root, staging, **publish_options)  # (expect_current: refresh's compare-and-publish)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for warning in result.warnings:  # after the switch: the version is published
        log.warning("published %s; %s", result.version_id, warning)
    ensure_links(store_root)
    return manifest, result


def build_store(store_root: str | os.PathLike, parquet_dir: str | os.PathLike, *,
                prefill: dict[str, Any] | None = None, command_line: str | None = None,
                progress: bool = False, on_built: Any = None, checkpoint: Path | None = None) -> dict[str, Any]:
    """Build a store version from PARQUET_DIR (part files + _layout.json) and publish it (with ``checkpoint``:
    its model beside it, :func:`attach_checkpoint`).

    ``prefill``: metadata of the run that wrote the Parquet (default: PARQUET_DIR/_prefill.json).
    ``on_built(manifest)``: called once the LMDB is built (``manifest['stats']``), before the metadata is written.
    Any failure removes the staging version and leaves ``current`` as it was. Returns the manifest.
    """
    root, src = Path(store_root), Path(parquet_dir)
    if not (src / PARQUET_LAYOUT_FILE).is_file():
        raise FileNotFoundError(f"{src}: not a prefill Parquet directory (no {PARQUET_LAYOUT_FILE})")
    if not list_parquet_files(src):  # a typo'd directory must not publish an empty store over a full one
        raise FileNotFoundError(f"{src} holds no Parquet part files (*.parquet): nothing to publish")
    prefill = prefill if prefill is not None else read_prefill_meta(src)
    root.mkdir(parents=True, exist_ok=True)

    def complete(staging: Path) -> dict[str, Any]:
        manifest = build_version(src, staging, parquet="link", progress=progress)
        if on_built is not None:  # last additions to the metadata (e.g. counts known once built)
            on_built(manifest)
        if prefill is not None:
            write_json(staging / PARQUET_DIR / PREFILL_META_FILE, prefill)
        manifest.update(summary_fields(manifest, prefill, command_line or shlex.join(sys.argv)))
        if checkpoint is not None:  # a rebuild keeps the model published with the store
            attach_checkpoint(staging, checkpoint, manifest)
        return manifest

    manifest, result = publish_staged(root, new_staging_dir(root), complete)
    log.info("published %s: %d users, LMDB %.1f MB on disk (previous %s, pruned %s)", result.version_id,
             manifest["users"], manifest["bytes"]["lmdb_disk"] / 1e6, result.previous, list(result.pruned))
    return manifest


def publish_sharded(store_root: Path, staging: Path, layout: Any, entries: list[dict], count: int, *,
                    prefill: dict[str, Any] | None, command_line: str, on_built: Any = None,
                    checkpoint: Path | None = None) -> dict[str, Any]:
    """Publish a sharded version whose shards were built into ``staging`` (:mod:`cachestore.store.shard_build`):
    ``parquet/_layout.json`` + ``_prefill.json``, ``layout.json`` and the manifest summed from the shard
    ``entries``, then the one atomic switch of ``current`` (all shards together). No per-user work."""
    from collectivekv.cachestore.store.shard_version import sharded_manifest

    def complete(staging: Path) -> dict[str, Any]:
        pdir = staging / PARQUET_DIR
        pdir.mkdir(exist_ok=True)
        write_layout(pdir / PARQUET_LAYOUT_FILE, layout)
        write_layout(staging / LAYOUT, layout)
        files = [{"name": PARQUET_LAYOUT_FILE, "bytes": (pdir / PARQUET_LAYOUT_FILE).stat().st_size}]
        files += [{"name": e["parquet"], "bytes": e["parquet_bytes"]}
                  for e in sorted(entries, key=lambda e: e["index"])]
        manifest = sharded_manifest(staging, layout, entries, count, files)
        if on_built is not None:
            on_built(manifest)
        if prefill is not None:
            write_json(pdir / PREFILL_META_FILE, prefill)
        manifest.update(summary_fields(manifest, prefill, command_line))
        if checkpoint is not None:
            attach_checkpoint(staging, checkpoint, manifest)
        return manifest

    manifest, result = publish_staged(store_root, staging, complete)
    log.info("published %s: %d users in %d shards, LMDB %.1f MB on disk (previous %s, pruned %s)", result.version_id,
             manifest["users"], count, manifest["bytes"]["lmdb_disk"] / 1e6, result.previous, list(result.pruned))
    return manifest


def read_manifest(store_root: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(version dir, manifest) of the version ``STORE/current`` points to (resolved once), after the cheap
    check of its LMDB file (:func:`cachestore.store.store_check.check_version`)."""
    from collectivekv.cachestore.store.publish import open_current
    from collectivekv.cachestore.store.shard_version import check_store_version

    version = Path(os.path.realpath(open_current(store_root)))
    check_store_version(version)  # every command that reports on a store validates it (StoreDamagedError)
    with open(version / MANIFEST, encoding="utf-8") as fh:
        return version, json.load(fh)
