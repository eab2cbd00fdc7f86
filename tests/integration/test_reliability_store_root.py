"""A store root is only ever written by ckv (cachestore/store/publish.py): `ckv store build` refuses a directory
that is not a store before building anything, publish prunes only the versions it wrote, a failure after the
atomic switch is a warning of a published version (not an error that reads "nothing published"), a staging
directory whose name is not a version id is refused before the switch, and the convenience links never replace
a link the user made."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import collectivekv.cachestore.store.publish as publish_mod
from collectivekv.cachestore.store.publish import (
    PublishError,
    build_and_publish,
    build_version,
    check_store_root,
    current_version_id,
    publish,
)
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.jobs.cli import main
from collectivekv.pipeline.store.store_ops import build_store, ensure_links
from tests.cachestore.store.test_lmdb_store import make_rows, shuffled_parts, write_parquet


def _parquet(path: Path, n: int, seed: int) -> Path:
    rows = make_rows(list(range(1, n + 1)), seed=seed)
    write_parquet(path, rows, parts=shuffled_parts(list(rows), 2))
    return path


def _tree(root: Path) -> dict[str, str]:
    """Every entry below root: file bytes, link targets, or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes().hex())
    return out


def test_store_build_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    pq = _parquet(tmp_path / "pq", 20, 1)
    mine = tmp_path / "mine"
    (mine / "versions" / "photos").mkdir(parents=True)
    (mine / "versions" / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    (mine / "elsewhere").mkdir()
    os.symlink("elsewhere", mine / "lmdb")
    (mine / "notes.txt").write_text("mine")
    before = _tree(mine)
    res = CliRunner().invoke(main, ["store", "build", str(pq), "--store", str(mine)])
    assert res.exit_code == 1 and "is not a store root" in res.output and "nothing was deleted" in res.output
    assert "elsewhere" in res.output and "notes.txt" in res.output and "versions/photos" in res.output
    assert _tree(mine) == before
    with pytest.raises(PublishError, match="versions/photos"):  # the library refuses it too, before any staging
        build_store(mine, pq)
    assert _tree(mine) == before


def test_a_store_root_with_logs_and_links_is_a_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    build_store(store, _parquet(tmp_path / "pq", 20, 1))
    (store / "logs").mkdir()
    (store / ".hidden").write_text("left alone")
    check_store_root(store)
    build_store(store, _parquet(tmp_path / "pq2", 25, 2))
    assert len(StoreReader.open_current(store)) == 25 and (store / ".hidden").read_text() == "left alone"


def test_a_failure_after_the_switch_is_a_warning_of_a_published_version(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    for k, n in enumerate((10, 20)):
        build_and_publish(store, _parquet(tmp_path / f"pq{k}", n, k))
    fsync, rmtree = publish_mod._fsync_dir, publish_mod.shutil.rmtree

    def eio_on_root(path: Path) -> None:
        if Path(path) == store:
            raise OSError(errno.EIO, "simulated")
        fsync(path)

    def refuse(path: Path, *args: object, **kw: object) -> None:
        if "versions" in str(path):
            raise OSError(errno.EBUSY, "simulated")
        rmtree(path, *args, **kw)

    monkeypatch.setattr(publish_mod, "_fsync_dir", eio_on_root)
    monkeypatch.setattr(publish_mod.shutil, "rmtree", refuse)
    result = build_and_publish(store, _parquet(tmp_path / "pq2", 30, 2))
    assert current_version_id(store) == result.version_id and len(StoreReader.open_current(store)) == 30
    assert result.pruned == () and len(result.warnings) == 2
    assert "fsync" in result.warnings[0] and "could not remove the old version" in result.warnings[1]
    monkeypatch.undo()
    again = build_and_publish(store, _parquet(tmp_path / "pq3", 40, 3))  # the next publish prunes what was left
    assert len(again.pruned) == 2 and sorted(os.listdir(store / "versions")) == sorted(
        [result.version_id, again.version_id])


def test_a_staging_directory_not_named_as_a_version_is_refused_before_the_switch(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = build_and_publish(store, _parquet(tmp_path / "pq", 10, 1))
    odd = store / "staging" / "nightly build 2026-12-04"
    build_version(_parquet(tmp_path / "pq2", 20, 2), odd)
    with pytest.raises(PublishError, match="is not a version id"):
        publish(store, odd)
    assert current_version_id(store) == first.version_id and len(StoreReader.open_current(store)) == 10


def test_convenience_links_leave_the_users_own_link(tmp_path: Path) -> None:
    store = tmp_path / "store"
    build_store(store, _parquet(tmp_path / "pq", 10, 1))
    assert os.readlink(store / "manifest.json") == "current/manifest.json"
    (store / "manifest.json").unlink()
    os.symlink("../somewhere/manifest.json", store / "manifest.json")
    ensure_links(store)
    assert os.readlink(store / "manifest.json") == "../somewhere/manifest.json"
    assert os.readlink(store / "layout.json") == "current/layout.json"


@pytest.mark.parametrize("shards", [1, 2])
def test_store_build_names_the_file_of_bad_parquet_sharded_or_not(tmp_path: Path, shards: int) -> None:
    """A missing column, a user in two files, no part files at all: one line naming the file(s), nothing published,
    whether the store is built whole or in shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = tmp_path / "store"
    build_store(store, _parquet(tmp_path / "good", 10, 1))
    before = current_version_id(store)

    def build(src: Path) -> str:
        res = CliRunner().invoke(main, ["store", "build", str(src), "--store", str(store), "--shards", str(shards)])
        assert res.exit_code == 1, res.output
        return res.output

    missing = _parquet(tmp_path / "missing", 10, 2)
    part = sorted(missing.glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(part).drop(["checksum"]), part)
    assert f"{part}: missing column 'checksum'" in build(missing)
    dup = _parquet(tmp_path / "dup", 10, 3)
    first, second = sorted(dup.glob("part-*.parquet"))
    pq.write_table(pa.concat_tables([pq.read_table(second), pq.read_table(first).slice(0, 1)]), second)
    out = build(dup)
    assert "duplicate user id" in out and first.name in out and second.name in out
    empty = _parquet(tmp_path / "empty", 10, 4)
    for p in empty.glob("part-*.parquet"):
        p.rename(p.with_suffix(".parq"))
    assert "holds no Parquet part files" in build(empty)
    assert current_version_id(store) == before and len(StoreReader.open_current(store)) == 10


def test_a_reader_of_a_pruned_version_says_so(tmp_path: Path) -> None:
    """A reader resolved before two newer publishes and first used after them: the version was pruned, not damaged."""
    store = tmp_path / "store"
    build_store(store, _parquet(tmp_path / "pq0", 10, 0))
    early = StoreReader.open_current(store)
    for k in (1, 2):
        build_store(store, _parquet(tmp_path / f"pq{k}", 10, k))
    with pytest.raises(FileNotFoundError, match="is no longer published.*open STORE/current again"):
        early.get(1)


def test_shard_folders_come_from_the_version_never_from_a_path_in_its_manifest(tmp_path: Path) -> None:
    """A manifest naming a shard folder outside the version (absolute, '..') or too few of them: ShardError, nothing
    opened; folders merely swapped stay readable (the deep check of `ckv store verify` names them)."""
    from collectivekv.cachestore.store.shards import SHARD_FUNCTION, ShardError, ShardSet

    def manifest(paths: list[str]) -> dict:
        return {"shards": {"function": SHARD_FUNCTION, "count": 2, "list": [{"path": p} for p in paths]}}

    for bad in ([str(tmp_path / "outside"), "shards/00001"], ["../../elsewhere", "shards/00001"], ["shards/00000"]):
        with pytest.raises(ShardError, match="is damaged"):
            ShardSet.of(tmp_path, manifest(bad))
    assert ShardSet.of(tmp_path, manifest(["shards/00001", "shards/00000"])).dir(0) == tmp_path / "shards" / "00001"


def test_a_publish_decided_against_one_version_is_refused_once_another_came_first(tmp_path: Path) -> None:
    """publish(expect_current=V): the switch happens only while `current` is V (checked under the publish lock) —
    what keeps a refresh gated against one model from replacing a newer one it was never compared with."""
    from collectivekv.cachestore.store.publish import CurrentMoved, new_staging_dir

    store = tmp_path / "store"
    first = build_and_publish(store, _parquet(tmp_path / "pq0", 10, 0))
    decided_against = current_version_id(store)
    build_and_publish(store, _parquet(tmp_path / "pq1", 15, 1))  # another publish comes first
    staging = new_staging_dir(store)
    build_version(_parquet(tmp_path / "pq2", 20, 2), staging)
    with pytest.raises(CurrentMoved, match=f"since this version was decided against {first.version_id}"):
        publish(store, staging, expect_current=decided_against)
    assert len(StoreReader.open_current(store)) == 15 and staging.is_dir()
    assert publish(store, staging, expect_current=current_version_id(store)).version_id == staging.name
