"""Atomic publication of whole store versions.

Store layout (STORE = store_root; see docs/store_format.md):

    STORE/parquet/                 prefill output (part files + _layout.json), rewritten by prefill
    STORE/staging/<id>/            a version being built (same filesystem as versions/)
    STORE/versions/<id>/           immutable published versions, each:
        lmdb/data.mdb              user records (record.py), key = user id '>Q'
        parquet/                   hard links (or copies) of the Parquet it was built from
        layout.json                the store's EntryLayout (entry.py)
        manifest.json              id, creation time, layout, build stats, parquet files, and the LMDB
                                   file's facts (size, meta page, keys CRC: store_check.py) (written last)
    STORE/current -> versions/<id> relative symlink: THE published version
    STORE/.publish.lock            flock held by a publisher (one publish at a time)

Invariants: a version directory is never modified after it leaves staging/. `current` changes
only by rename(2) of a fresh symlink over it (os.replace), so every reader resolves either the old
or the new version, never a mix; readers resolve `current` once (open_current) and then use the
version directory. publish keeps the new version and the one `current` pointed to before, and
prunes every other version (older ones and orphans of crashed publishes): only directories publish
wrote (a version-id name holding a manifest of that id). A failure before the rename of the symlink
leaves `current` untouched; once it is renamed the version is published, and what follows (the
directory's fsync, the pruning) reports its failures in ``PublishResult.warnings`` instead of raising.
Readers still on a pruned version keep reading their open LMDB map (POSIX keeps unlinked files alive)
but can no longer open it anew.

A store root holds nothing but the entries above (:data:`STORE_ENTRIES`, the convenience links of
docs/store_format.md and ``logs/``; names starting with "." are left alone): :func:`check_store_root`
refuses any other directory before a staging directory is made in it or a version is published, so no
command deletes or relinks what it did not write.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb

from collectivekv.cachestore.store.entry import read_layout
from collectivekv.cachestore.store.lmdb_build import PARQUET_LAYOUT_FILE, build_lmdb, list_parquet_files
from collectivekv.cachestore.store.record import write_layout
from collectivekv.cachestore.store.store_tree import lmdb_facts

CURRENT = "current"
VERSIONS = "versions"
STAGING = "staging"
MANIFEST = "manifest.json"
LAYOUT = "layout.json"
LMDB_DIR = "lmdb"
MANIFEST_VERSION = 1
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# what a store root may hold (publish's entries, the prefill's parquet/ and logs/, the convenience links)
STORE_ENTRIES = frozenset({"parquet", STAGING, VERSIONS, CURRENT, LMDB_DIR, "shards", MANIFEST, LAYOUT, "logs"})


class PublishError(RuntimeError):
    """A staging directory that cannot be published, or a store root in an unexpected state."""


@dataclass(frozen=True)
class PublishResult:
    """The published version; the one ``current`` pointed to before; the versions pruned; what failed after the
    switch (the version is published regardless: a directory fsync, a version that could not be removed)."""

    version_id: str
    version_dir: Path
    previous: str | None
    pruned: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def new_version_id() -> str:
    """Sortable, unique id: UTC time to the microsecond + 8 random hex chars."""
    t = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f"{int(t % 1 * 1e6):06d}Z"
    return f"{stamp}-{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_synced(path: Path, data: dict) -> None:
    """Write JSON (indented, sorted keys) and fsync it."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _is_version_dir(path: Path) -> bool:
    """A directory publish wrote under versions/: a version-id name (no link) holding a manifest of that id."""
    if path.is_symlink() or not path.is_dir() or not _VERSION_NAME.fullmatch(path.name):
        return False
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("version_id") == path.name
    except (OSError, ValueError, AttributeError):
        return False


def check_store_root(store_root: str | os.PathLike) -> None:
    """PublishError unless ``store_root`` is absent, empty, or a store root: only :data:`STORE_ENTRIES` (and names
    starting with ".") and versions/ holding only published versions. The message names the foreign entries;
    nothing is deleted."""
    root = Path(store_root)
    if not root.exists():
        return
    if not root.is_dir():
        raise PublishError(f"store root {root} exists and is not a directory")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in STORE_ENTRIES and not p.name.startswith("."))
    foreign += sorted(f"{VERSIONS}/{p.name}" for p in (root / VERSIONS).iterdir()
                      if not _is_version_dir(p)) if (root / VERSIONS).is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        raise PublishError(f"{root} is not a store root: it holds {shown}, which no ckv command writes there; "
                           "nothing was deleted: give a new or empty directory, or a store root")


def new_staging_dir(store_root: str | os.PathLike) -> Path:
    """Create and return an empty STORE/staging/<new id>/ (same filesystem as versions/), after
    :func:`check_store_root`."""
    check_store_root(store_root)
    path = Path(store_root) / STAGING / new_version_id()
    path.mkdir(parents=True)
    return path


def build_version(parquet_dir: str | os.PathLike, staging_dir: str | os.PathLike, *,
                  parquet: str = "link", progress: bool = False) -> dict:
    """Fill STAGING_DIR (named <version id>) with lmdb/, parquet/, layout.json, then manifest.json.

    parquet: "link" (hard links, copies across filesystems), "copy", or "none". Returns the manifest.
    """
    if parquet not in ("link", "copy", "none"):
        raise ValueError(f"parquet must be 'link', 'copy' or 'none', got {parquet!r}")
    src, staging = Path(parquet_dir), Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    stats = build_lmdb(src, staging / LMDB_DIR, progress=progress)
    files = []
    if parquet != "none":
        (staging / "parquet").mkdir()
        for path in [src / PARQUET_LAYOUT_FILE, *list_parquet_files(src)]:
            dest = staging / "parquet" / path.name
            linked = False
            if parquet == "link":
                try:
                    os.link(path, dest)
                    linked = True
                except OSError:  # another filesystem, or links not allowed: copy
                    pass
            if not linked:
                shutil.copy2(path, dest)
            files.append({"name": path.name, "bytes": dest.stat().st_size})
    write_layout(staging / LAYOUT, stats.layout)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "version_id": staging.name,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "record_format_version": stats.layout.record_format,
        "layout": stats.layout.to_dict(),
        "stats": {k: v for k, v in asdict(stats).items() if k != "layout" and not (k == "part_rows" and v is None)},
        "parquet": {"mode": parquet, "source": str(src.resolve()), "files": files},
        "lmdb": lmdb_facts(staging / LMDB_DIR),
    }
    write_json_synced(staging / MANIFEST, manifest)
    _fsync_dir(staging)
    return manifest


def _check_staging(staging: Path) -> dict:
    """A staging dir must be complete and self-consistent before it may be published."""
    for rel in (MANIFEST, LAYOUT):
        if not (staging / rel).is_file():
            raise PublishError(f"{staging} is incomplete: no {rel}")
    with open(staging / MANIFEST, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if not _VERSION_NAME.fullmatch(staging.name):
        raise PublishError(f"{staging}: {staging.name!r} is not a version id (letters, digits, '.', '_', '-'; "
                           "make staging directories with new_staging_dir)")
    if manifest.get("version_id") != staging.name:
        raise PublishError(f"{staging}: manifest version_id {manifest.get('version_id')!r} != dir name")
    if read_layout(staging / LAYOUT).to_dict() != manifest.get("layout"):
        raise PublishError(f"{staging}: layout.json differs from the manifest's layout")
    shards = manifest.get("shards")
    dirs = [(staging / s["path"], s["users"]) for s in shards["list"]] if shards else [(staging, None)]
    if shards and len(dirs) != shards.get("count"):
        raise PublishError(f"{staging}: the manifest lists {len(dirs)} shards of {shards.get('count')}")
    for vdir, users in dirs:
        _check_records(staging, vdir, manifest.get("stats", {}).get("users") if users is None else users)
    return manifest


def _check_records(staging: Path, vdir: Path, users: int | None) -> None:
    """The LMDB of a version (or of one of its shards) exists and holds the users its manifest counts."""
    if not (vdir / LMDB_DIR / "data.mdb").is_file():
        raise PublishError(f"{staging} is incomplete: no {(vdir / LMDB_DIR).relative_to(staging)}/data.mdb")
    env = lmdb.open(str(vdir / LMDB_DIR), subdir=True, readonly=True, lock=False, max_dbs=0)
    try:
        entries = env.stat()["entries"]
    finally:
        env.close()
    if entries != users:
        raise PublishError(f"{vdir}: LMDB holds {entries} records, manifest says {users}")


@contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    with open(root / ".publish.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _checked_target(root: Path, target: str) -> str:
    """The version id of a `current` link target; PublishError unless it is exactly versions/<id>
    with a plain name (no '..', no absolute path, no nesting) that resolves inside STORE/versions."""
    parts = target.split("/")
    if len(parts) != 2 or parts[0] != VERSIONS or not _VERSION_NAME.fullmatch(parts[1]):
        raise PublishError(f"{root / CURRENT} points to {target!r}, not to {VERSIONS}/<version id>: the store "
                           "root is damaged or was tampered with; refusing to follow it (re-publish a version)")
    versions = os.path.realpath(root / VERSIONS)
    if os.path.dirname(os.path.realpath(root / target)) != versions:
        raise PublishError(f"{root / target} resolves outside {versions}: refusing to follow it")
    return parts[1]


def current_version_id(store_root: str | os.PathLike) -> str | None:
    """The id `current` points to, or None before the first publish."""
    link = Path(store_root) / CURRENT
    if not link.is_symlink():
        if link.exists():
            raise PublishError(f"{link} exists but is not a symlink")
        return None
    return _checked_target(Path(store_root), os.readlink(link))


class CurrentMoved(PublishError):
    """``current`` is not the version a publish was decided against (another publish came first)."""


_ANY = object()


def publish(store_root: str | os.PathLike, staging_dir: str | os.PathLike,
            expect_current: str | None | object = _ANY) -> PublishResult:
    """Move a complete staging dir to versions/<id> and switch `current` to it atomically.

    Order: validate; rename staging -> versions/<id>; fsync; symlink .current.tmp-* -> versions/<id>;
    os.replace it over `current` (the one atomic switch); fsync; prune all but new + previous.
    ``expect_current`` (a version id, or None for an empty store): publish only if `current` is still that
    version, checked under the publish lock — :class:`CurrentMoved` otherwise, the staging dir untouched (a
    refresh gated against one model never replaces a newer one it was not compared with).
    """
    root, staging = Path(store_root), Path(staging_dir)
    versions = root / VERSIONS
    check_store_root(root)  # before anything is written there (the lock file, versions/) ...
    versions.mkdir(parents=True, exist_ok=True)
    with _publish_lock(root):
        check_store_root(root)  # ... and again where no other publish can change it until the switch
        _check_staging(staging)
        vid = staging.name
        dest = versions / vid
        if dest.exists() or os.path.lexists(dest):
            raise PublishError(f"version {vid} already exists in {versions}")
        if os.stat(staging).st_dev != os.stat(versions).st_dev:
            raise PublishError(f"{staging} is not on the filesystem of {versions}; use new_staging_dir")
        previous = current_version_id(root)
        if expect_current is not _ANY and previous != expect_current:
            raise CurrentMoved(f"{root / CURRENT} moved to {previous} since this version was decided against "
                               f"{expect_current}: nothing published (run it again)")
        os.rename(staging, dest)
        _fsync_dir(versions)
        _fsync_dir(staging.parent)
        tmp = root / f".{CURRENT}.tmp-{secrets.token_hex(4)}"
        os.symlink(f"{VERSIONS}/{vid}", tmp)
        try:
            os.replace(tmp, root / CURRENT)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _after_switch(root, vid, dest, previous)


def _after_switch(root: Path, vid: str, dest: Path, previous: str | None) -> PublishResult:
    """fsync the root and prune all but ``vid`` and ``previous`` (only version directories): the version is
    published already, so a failure here is a warning in the result, not an exception."""
    warnings: list[str] = []
    try:
        _fsync_dir(root)
    except OSError as exc:
        warnings.append(f"fsync of {root} failed ({exc}): the switch to {vid} may not survive a power loss")
    versions, pruned = root / VERSIONS, []
    for path in sorted(versions.iterdir()):
        if path.name in (vid, previous) or not _is_version_dir(path):
            continue
        try:
            shutil.rmtree(path)
            pruned.append(path.name)
        except OSError as exc:
            warnings.append(f"could not remove the old version {path} ({exc}); the next publish retries")
    return PublishResult(vid, dest, previous, tuple(pruned), tuple(warnings))


def open_current(store_root: str | os.PathLike) -> Path:
    """Resolve `current` once to its version directory (use that path from then on)."""
    root = Path(store_root)
    try:
        target = os.readlink(root / CURRENT)
    except FileNotFoundError:
        raise FileNotFoundError(f"no published store version under {root} (no '{CURRENT}' link): not a store "
                                "root, or nothing was published yet") from None
    except OSError as exc:
        raise PublishError(f"{root / CURRENT} is not a symlink to a version ({exc}): not a store root") from exc
    return root / VERSIONS / _checked_target(root, target)


def build_and_publish(store_root: str | os.PathLike, parquet_dir: str | os.PathLike | None = None, *,
                      parquet: str = "link", progress: bool = False) -> PublishResult:
    """Build a new version from PARQUET_DIR (default STORE/parquet) in staging and publish it.

    Any failure removes the staging dir and leaves `current` (and every version) as it was.
    """
    root = Path(store_root)
    staging = new_staging_dir(root)
    try:
        build_version(parquet_dir if parquet_dir is not None else root / "parquet", staging,
                      parquet=parquet, progress=progress)
        return publish(root, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
