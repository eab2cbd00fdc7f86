"""Security: no unsafe deserialisation anywhere in the code, store readers open LMDB read-only, and
paths taken from a store (the `current` link) cannot lead outside the store directory."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import lmdb
import pytest
import torch
from click.testing import CliRunner

from collectivekv.cachestore.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint
from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.publish import PublishError, current_version_id, open_current
from collectivekv.cachestore.store.reader import StoreReader
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.cachestore.store.test_lmdb_store import make_rows, write_parquet

ROOT = Path(__file__).resolve().parents[2]


def project_py_files() -> list[Path]:
    """Every .py file git knows of or would add (tracked + untracked, not ignored: no .venv)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file()]


# (pattern, what must follow within the call for it to be safe, or None: never allowed)
UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal|joblib)\b", re.M), None),
    (re.compile(r"\b(c?pickle|dill|cloudpickle|marshal|joblib)\.loads?\("), None),
    (re.compile(r"\bread_pickle\("), None),
    (re.compile(r"\btorch\.load\("), re.compile(r"weights_only\s*=\s*True")),
    (re.compile(r"\b(np|numpy)\.load\("), re.compile(r"allow_pickle\s*=\s*False")),
    (re.compile(r"\byaml\.load\("), re.compile(r"Loader\s*=\s*yaml\.SafeLoader")),
]


def _call_text(src: str, start: int) -> str:
    """The source of the call starting at `start` up to its closing parenthesis."""
    depth, i = 0, src.index("(", start)
    for j in range(i, min(len(src), i + 2000)):
        depth += {"(": 1, ")": -1}.get(src[j], 0)
        if depth == 0:
            return src[start : j + 1]
    return src[start : i + 2000]


def unsafe_calls(src: str) -> list[tuple[int, str]]:
    """(line, text) of every unsafe deserialisation call or import in python source `src`."""
    out = []
    for pattern, required in UNSAFE:
        for m in pattern.finditer(src):
            if required is None or not required.search(_call_text(src, m.start())):
                out.append((src[: m.start()].count("\n") + 1, m.group(0).strip()))
    return out


def test_the_scanner_flags_unsafe_calls() -> None:
    flagged = unsafe_calls("import pickle\nx = torch.load(f)\ny = np.load(p)\nz = pd.read_pickle(q)\n")
    assert sorted(line for line, _ in flagged) == [1, 2, 3, 4]
    assert unsafe_calls("x = torch.load(\n    f, map_location='cpu', weights_only=True)\n"
                        "y = np.load(p, allow_pickle=False)\n") == []


def test_no_unsafe_deserialisation_in_the_code() -> None:
    files = project_py_files()
    assert len(files) > 20 and any(f.name == "reader.py" for f in files)
    me = Path(__file__).resolve()
    bad = [f"{path.relative_to(ROOT)}:{line}: {text}" for path in files if path.resolve() != me
           for line, text in unsafe_calls(path.read_text(encoding="utf-8", errors="replace"))]
    assert not bad, "unsafe deserialisation:\n" + "\n".join(bad)


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(tmp_path: Path) -> None:
    from tests.pipeline.prefill.prefill_helpers import make_model, small_config

    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, make_model(small_config()), {})
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Exploit()}, ckpt / WEIGHTS_FILE)  # a pickle that runs a command when unpickled
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*never pickle"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        load_checkpoint(ckpt)


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    from collectivekv.cachestore.store.publish import build_and_publish

    root = tmp_path / "store"
    write_parquet(root / "parquet", make_rows(list(range(30))), parts=[list(range(30))])
    build_and_publish(root)
    return root


def test_readers_open_lmdb_read_only(store: Path) -> None:
    reader = StoreReader.open_current(store)
    assert reader.get(3) is not None
    env = reader._environment()
    flags = env.flags()
    assert flags["readonly"] is True and flags["lock"] is False
    with pytest.raises(lmdb.ReadonlyError), env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    # the serving runtime reads through the same kind of reader
    from tests.model.test_model import make_model as serving_model
    from tests.model.test_model import small_config as serving_config

    model = serving_model(serving_config(), seed=0).eval()
    with pytest.raises(Exception, match="model version"):  # refused before any read: different version
        DecodeRuntime(model, "ffffffffffffffff", reader, device="cpu")
    # the store files stay byte-identical after readers ran
    before = (reader.version_dir / "lmdb" / "data.mdb").read_bytes()
    list(reader.iter_records())
    reader.close()
    assert (reader.version_dir / "lmdb" / "data.mdb").read_bytes() == before


@pytest.mark.parametrize("target", ["../../etc", "/etc", "versions/../../x", "versions/a/b", "versions/..",
                                    "elsewhere/v1", "versions/.hidden"])
def test_current_link_cannot_escape_the_store(store: Path, tmp_path: Path, target: str) -> None:
    link = store / "current"
    link.unlink()
    os.symlink(target, link)
    for call in (open_current, current_version_id, StoreReader.open_current):
        with pytest.raises(PublishError, match="refusing to follow"):
            call(store)
    from collectivekv.jobs.store import store as store_cli

    r = CliRunner().invoke(store_cli, ["verify", str(store), "--checkpoint", str(tmp_path), "--histories",
                                       str(tmp_path)])
    assert r.exit_code == 1


def test_version_dir_symlinked_outside_is_refused(store: Path, tmp_path: Path) -> None:
    vid = current_version_id(store)
    outside = tmp_path / "outside"
    os.rename(store / "versions" / vid, outside)
    os.symlink(outside, store / "versions" / vid)
    with pytest.raises(PublishError, match="resolves outside"):
        open_current(store)
    (store / "current").unlink()
    (store / "current").write_text("not a link")
    with pytest.raises(PublishError, match="not a symlink"):
        current_version_id(store)
    with pytest.raises(PublishError, match="not a store root"):
        open_current(store)
