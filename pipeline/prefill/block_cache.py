"""A directory of computed memo blocks shared by the processes of one machine (pipeline/prefill/prefill.py).

Every Python worker of a Spark executor runs its own :class:`pipeline.prefill.prefill.MemoEngine`; without
sharing, each of them would run the router over the same vocabulary blocks (the dominant cost of a
cold worker). With a shared directory (Spark: under ``SparkFiles.getRootDirectory()``, one per
executor and application) a block is computed once per machine: a worker takes ``block-<b>.lock``
(O_CREAT | O_EXCL), computes, writes ``block-<b>.npz`` atomically (temp file + rename), drops the
lock; the others skip locked blocks, compute the next ones, and load the locked ones when they
appear. A lock whose owner died (same host, pid gone) or that is held longer than ``wait_s`` is
ignored and the block computed locally. Blocks are bit-identical whoever computes them (fixed call
shape, see MemoEngine), so a race only costs time.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


class SharedBlocks:
    def __init__(self, root: str | os.PathLike, wait_s: float = 300.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.wait_s = wait_s
        self.computed = 0
        self.loaded = 0
        self._me = f"{socket.gethostname()} {os.getpid()}"

    def _path(self, b: int, suffix: str) -> Path:
        return self.root / f"block-{b}.{suffix}"

    def _load(self, b: int) -> Arrays | None:
        path = self._path(b, "npz")
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def _save(self, b: int, arrays: Arrays) -> None:
        tmp = self.root / f".block-{b}.{os.getpid()}.npz"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, self._path(b, "npz"))

    def _lock(self, b: int) -> bool:
        try:
            fd = os.open(self._path(b, "lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(self._me)
        return True

    def _stale(self, b: int) -> bool:
        """The lock's owner is a dead process of this host."""
        try:
            host, pid = self._path(b, "lock").read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def fetch(self, blocks: list[int], compute: Callable[[int], Arrays]) -> Iterator[tuple[int, Arrays]]:
        """(b, arrays) for every block, loaded if another process computed it, else computed here."""
        pending, since = list(blocks), time.monotonic()
        while pending:
            waiting = []
            for b in pending:
                arrays = self._load(b)
                if arrays is not None:
                    self.loaded += 1
                elif self._lock(b):
                    try:
                        arrays = compute(b)
                        self._save(b, arrays)
                    finally:
                        self._path(b, "lock").unlink(missing_ok=True)
                    self.computed += 1
                elif self._stale(b) or time.monotonic() - since > self.wait_s:
                    arrays = compute(b)
                    self.computed += 1
                else:
                    waiting.append(b)
                    continue
                yield b, arrays
            if waiting:
                time.sleep(0.02)
            pending = waiting
