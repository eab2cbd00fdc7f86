"""Writing a command's output safely: never delete what the command did not write, never half-publish.

Every command that writes a directory (`ckv data prepare`, `ckv train`, `ckv experiment`) or a file
(`ckv score`) goes through this module:

- **Kinds.** A directory output has a kind (:class:`OutputKind`): a name, the command that writes it,
  the top-level entries it may hold and its signature (the metadata files the command always writes,
  e.g. a dataset's ``meta.json`` + ``histories.parquet``). An existing directory is "of its own kind"
  when it has every signature file **and** holds nothing but the kind's entries.
- **Refusals** (:class:`OutputError`, one line naming the path and what to do): an ``--out`` that is a
  file; that equals or contains one of the command's inputs; that is non-empty and not of the
  command's kind; or that is of its kind without ``--overwrite``.
- **Atomic directory replace** (:func:`replace_dir`): the command writes into a ``mkdtemp`` sibling
  (``.NAME.tmp-XXXX``, same filesystem); on success the old directory is renamed aside
  (``.NAME.old-XXXX``), the new one renamed in, the old one deleted. On failure the temp directory is
  removed and ``--out`` is untouched; a reader sees the old or the new directory, never a mix.
- **Atomic file replace** (:func:`replace_file`): a unique ``mkstemp`` file beside the target
  (``.NAME.XXXX.tmp``), ``os.replace``-d over it on success, so concurrent writers of one target
  never share a temp file: the last one to finish wins and the target is always a complete file.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class OutputError(ValueError):
    """An output path the command refuses to write; the message names the path and what to do."""


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output directory.

    ``entries``: the top-level names it may write; ``signature``: the entries every output of this
    kind has (its metadata files), which identify it; ``nested``: the paths (``fnmatch`` patterns, relative,
    '/'-separated) it may write below its top-level directories — anything else down there is foreign too.
    """

    name: str
    command: str
    entries: frozenset[str]
    signature: tuple[str, ...]
    nested: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{'an' if self.name[0] in 'aeiou' else 'a'} {self.name} written by `{self.command}`"


def foreign_entries(path: Path, kind: OutputKind) -> list[str]:
    """Entries of the directory ``path`` that ``kind``'s command does not write (sorted): top-level names outside
    ``kind.entries``, and below its top-level directories every file or folder no ``kind.nested`` pattern covers
    (a folder is covered when a pattern reaches below it)."""
    foreign = []
    for p in sorted(path.iterdir()):
        if p.name not in kind.entries:
            foreign.append(p.name)
        elif p.is_dir() and not p.is_symlink():
            foreign += [rel for rel in _below(p, path) if not _covered(rel, kind.nested, (path / rel).is_dir())]
    return foreign


def _below(top: Path, root: Path) -> list[str]:
    return sorted(str(q.relative_to(root).as_posix()) for q in top.rglob("*"))


def _covered(rel: str, patterns: tuple[str, ...], is_dir: bool) -> bool:
    depth = rel.count("/") + 1
    for pattern in patterns:
        parts = pattern.split("/")
        if fnmatch.fnmatchcase(rel, pattern) and not is_dir:
            return True
        if is_dir and len(parts) > depth and fnmatch.fnmatchcase(rel, "/".join(parts[:depth])):
            return True
    return False


def is_own_kind(path: Path, kind: OutputKind) -> bool:
    """True if the directory ``path`` was written by ``kind``'s command and holds nothing else."""
    return all((path / f).exists() for f in kind.signature) and not foreign_entries(path, kind)


def _resolved(out: Path, paths: Iterable[str | os.PathLike | None]) -> tuple[Path, list[tuple[object, Path]]]:
    """(out, [(path as given, path)]) with every path resolved (links followed); None entries skipped."""
    return Path(os.path.realpath(out)), [(p, Path(os.path.realpath(p))) for p in paths if p is not None]


def check_not_input(out: Path, inputs: Iterable[str | os.PathLike | None], option: str = "--out") -> None:
    """Refuse an output that equals or contains one of ``inputs`` (None entries are skipped)."""
    target, sources = _resolved(out, inputs)
    for item, src in sources:
        if src == target or target in src.parents:
            what = "is" if src == target else "contains"
            raise OutputError(f"{option} {out} {what} the input {item}: writing there would replace the input; "
                              "choose another output path")


def check_not_inside(out: Path, dirs: Iterable[str | os.PathLike | None], option: str = "--out") -> None:
    """Refuse an output file that is one of ``dirs`` or lies inside one (a store, a checkpoint: writing there
    would replace a file they hold); None entries are skipped."""
    target, sources = _resolved(out, dirs)
    for item, src in sources:
        if src == target or src in target.parents:
            raise OutputError(f"{option} {out} is inside {item}: writing there would replace a file it holds; "
                              "choose a path outside it")


def check_output_dir(out: Path, kind: OutputKind, *, overwrite: bool,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Raise OutputError unless ``out`` may be (re)written by ``kind``'s command (see the module doc)."""
    check_not_input(out, inputs)
    if out.is_symlink():
        raise OutputError(f"--out {out}: is a symbolic link; give the directory itself (nothing was written)")
    if os.path.abspath(out) == os.getcwd():  # replacing it would leave the shell in a deleted directory
        raise OutputError(f"--out {out}: is the current directory; give a new directory's path")
    blocking = next((p for p in Path(os.path.abspath(out)).parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"--out {out}: {blocking} is a file, not a directory; choose another path")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory; choose a new or empty directory")
    if not any(out.iterdir()):
        return
    if not is_own_kind(out, kind):
        foreign = foreign_entries(out, kind)
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        why = f"holds {shown}" if foreign else f"no {' / '.join(kind.signature)}"
        raise OutputError(f"--out {out}: not empty and not {kind.describe()} ({why}); nothing was deleted: "
                          "choose a new or empty directory")
    if not overwrite:
        raise OutputError(f"--out {out}: already holds {kind.describe()}; pass --overwrite to replace it "
                          "(atomically, on success) or choose another directory")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``out`` aside, ``tmp`` in, then delete the old one; on a failed rename restore ``out``."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    moved = False
    if out.exists():
        os.rename(out, old)
        moved = True
    try:
        os.rename(tmp, out)
    except OSError:
        if moved:
            os.rename(old, out)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replace_dir(out: str | os.PathLike, kind: OutputKind, *, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temp directory beside ``out`` to write into; on success it atomically becomes ``out``.

    Checks ``out`` first (:func:`check_output_dir`) and again just before the swap (another process
    may have written there meanwhile).
    """
    out = Path(os.path.abspath(out))  # "." or "a/..": the temp directory goes beside the real one
    inputs = list(inputs)
    check_output_dir(out, kind, overwrite=overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the published directory private
    try:
        yield tmp
        check_output_dir(out, kind, overwrite=overwrite, inputs=inputs)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replace_file(target: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 option: str = "--out") -> Iterator[Path]:
    """Yield a unique temp file beside ``target``; on success it is ``os.replace``-d over the target.

    Refuses a target that is a directory or one of ``inputs``. The temp file exists (empty) when
    yielded; the caller may overwrite it. On any failure it is removed and the target untouched.
    """
    target = Path(target)
    check_not_input(target, inputs, option)
    if target.is_dir():
        raise OutputError(f"{option} {target}: is a directory; give a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the published file private
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
