"""Damaged LMDB files of a published store: truncation, zeroed / garbage / bit-flipped meta, branch and
leaf pages. Every command that reads a store runs as a real subprocess (``python -m collectivekv.jobs.cli``) and must
end with an exit status != 0 and one clear stderr line naming the version and ``ckv store verify`` —
never a signal (SIGBUS was exit 135 / -7) and never a traceback. A hypothesis fuzz damages the file at
random offsets and scores every user (CRC-verified, the ``ckv score`` default) in a forked child: a
clear error or exactly the undamaged scores."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from collectivekv.cachestore.decode.runtime import DecodeRuntime
from collectivekv.cachestore.store.publish import open_current
from collectivekv.cachestore.store.store_check import P_BRANCH, P_LEAF, StoreDamagedError, check_version, read_meta
from collectivekv.cachestore.store.store_tree import check_tree
from collectivekv.pipeline.prefill.prefill import cache_layout
from collectivekv.pipeline.training.checkpoint import save_checkpoint
from tests.helpers import CKV, repo_env
from tests.pipeline.prefill.prefill_helpers import N_ITEMS, histories, make_model, small_config, write_prefill

ROOT = Path(__file__).resolve().parents[2]
N_USERS = 300  # ~10 leaf pages under one branch page
FAIL_ALL = ("verify", "score", "score-no-crc", "size", "capacity", "html")  # every command that reads a store
READS = ("verify", "score", "score-no-crc")  # commands that read records; reports check only the cheap facts


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store of 300 users (max_len 8), its checkpoint, histories, requests and reference scores."""
    from collectivekv.pipeline.store.store_ops import build_store

    tmp = tmp_path_factory.mktemp("damage")
    model = make_model(small_config())
    version = save_checkpoint(tmp / "ckpt", model, {})
    hist = histories([int(n) for n in np.random.default_rng(5).integers(0, 10, N_USERS)], first_user=0)
    (tmp / "hist").mkdir()
    pq.write_table(pa.Table.from_batches([hist]), tmp / "hist" / "h.parquet")
    build_store(tmp / "store", write_prefill(tmp, model, cache_layout(model.cfg, version), [hist]),
                command_line="t")
    users = np.arange(N_USERS, dtype=np.int64)
    items = users % N_ITEMS + 1
    (tmp / "req.csv").write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in zip(users, items, strict=True)))
    rt = DecodeRuntime.open(tmp / "store", tmp / "ckpt", device="cpu", verify_crc=True)
    ref = rt.score(users, items[:, None])
    rt.reader.close()
    data = open_current(tmp / "store") / "lmdb" / "data.mdb"
    meta = read_meta(data)
    raw = data.read_bytes()
    flags = [int.from_bytes(raw[p * meta.page_size + 10 : p * meta.page_size + 12], "little")
             for p in range(meta.last_page + 1)]
    return {"tmp": tmp, "store": tmp / "store", "ckpt": tmp / "ckpt", "users": users, "items": items, "ref": ref,
            "meta": meta, "branch": [p for p, f in enumerate(flags) if f & P_BRANCH],
            "leaf": [p for p, f in enumerate(flags) if f & P_LEAF]}


def damaged_copy(made: dict, dest: Path, kind: str, offset: int, bit: int = 0) -> Path:
    """A copy of the store whose data.mdb is damaged: "truncate" to ``offset`` bytes, "zero" / "garbage"
    the page holding ``offset``, or "flip" bit ``bit`` of byte ``offset``. Returns the copy's root."""
    shutil.copytree(made["store"], dest, symlinks=True)
    path = open_current(dest) / "lmdb" / "data.mdb"
    psize = made["meta"].page_size
    if kind == "truncate":
        os.truncate(path, offset)
        return dest
    with open(path, "r+b") as fh:
        if kind == "flip":
            fh.seek(offset)
            byte = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([byte ^ (1 << bit)]))
        else:
            fh.seek(offset // psize * psize)
            rng = np.random.default_rng(offset)
            fh.write(bytes(psize) if kind == "zero" else rng.integers(0, 256, psize, dtype=np.uint8).tobytes())
    return dest


def _argv(made: dict, store: Path, command: str) -> list[str]:
    tmp, ckpt = made["tmp"], str(made["ckpt"])
    score = ["score", "--store", str(store), "--checkpoint", ckpt, "--requests", str(tmp / "req.csv"),
             "--out", str(store.parent / f"{store.name}-{command}.parquet"), "--device", "cpu"]
    return {"verify": ["store", "verify", str(store), "--checkpoint", ckpt, "--histories", str(tmp / "hist")],
            "score": score, "score-no-crc": [*score, "--no-verify-crc"],
            "size": ["report", "size", str(store)], "capacity": ["capacity", "--store", str(store)],
            "html": ["report", "html", str(store), "--checkpoint", ckpt, "--users", "8",
                     "--out", str(store.parent / f"{store.name}.html")]}[command]


def run_commands(made: dict, store: Path, commands: tuple[str, ...]) -> dict[str, subprocess.CompletedProcess]:
    """Run each `ckv` command on ``store`` as its own subprocess, two at a time."""
    env = repo_env()
    done: dict[str, subprocess.CompletedProcess] = {}
    for i in range(0, len(commands), 2):
        procs = {c: subprocess.Popen([*CKV, *_argv(made, store, c)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands[i : i + 2]}
        for c, p in procs.items():
            out, err = p.communicate(timeout=300)
            done[c] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def assert_clear_failure(name: str, proc: subprocess.CompletedProcess, store: Path) -> None:
    """Exit status 1 (not a signal), one stderr line: 'Error: store version … is damaged …'."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"{name}: {proc.stderr[-2000:]}"
    assert "is damaged" in lines[0] and "ckv store verify" in lines[0] and str(store.resolve()) in lines[0], lines[0]


CASES = [  # (name, kind, where, bit, commands run: each must refuse with one clear line)
    ("truncated to half", "truncate", "half", 0, FAIL_ALL),
    ("truncated by 100 bytes", "truncate", "end-100", 0, READS),
    ("meta page 0 zeroed", "zero", "meta0", 0, ("verify", "score", "size", "capacity")),
    ("meta page 1 garbage", "garbage", "meta1", 0, READS),
    ("meta root flipped", "flip", "meta-root", 1, READS),
    ("branch page zeroed", "zero", "branch", 0, READS),
    ("branch child pointer flipped", "flip", "branch-child", 6, READS),
    ("leaf page garbage", "garbage", "leaf", 0, READS),
    ("leaf key flipped", "flip", "leaf-key", 0, ("verify", "score")),  # no CRC pass: a cold start, see docs
]


def _offset(made: dict, where: str) -> int:
    meta, psize = made["meta"], made["meta"].page_size
    size = (meta.last_page + 1) * psize
    branch, leaf = made["branch"][0] * psize, made["leaf"][len(made["leaf"]) // 2] * psize
    # meta page: main db root at byte 128 of a meta page (store_check._META); branch / leaf: the first node
    # (its offset is the page's first node pointer, bytes 16..17); a branch node's child page number starts
    # at its byte 0, a leaf node's key at its byte 8 (+7: the key's last, big-endian low byte)
    return {"half": size // 2 // psize * psize, "end-100": size - 100, "meta0": 0, "meta1": psize,
            "meta-root": (0 if _txnid(made, 0) >= _txnid(made, 1) else psize) + 128, "branch": branch,
            "branch-child": branch + _first_node(made, branch) + 1, "leaf": leaf,
            "leaf-key": leaf + _first_node(made, leaf) + 8 + 7}[where]


def _page_bytes(made: dict, at: int, n: int) -> bytes:
    with open(open_current(made["store"]) / "lmdb" / "data.mdb", "rb") as fh:
        fh.seek(at)
        return fh.read(n)


def _first_node(made: dict, page_at: int) -> int:
    return int.from_bytes(_page_bytes(made, page_at + 16, 2), "little")


def _txnid(made: dict, page: int) -> int:
    return int.from_bytes(_page_bytes(made, page * made["meta"].page_size + 144, 8), "little")


@pytest.mark.parametrize(("name", "kind", "where", "bit", "must_fail"), CASES, ids=[c[0] for c in CASES])
def test_every_command_refuses_a_damaged_store(made: dict, tmp_path: Path, name: str, kind: str, where: str,
                                               bit: int, must_fail: tuple[str, ...]) -> None:
    """A truncated data.mdb or damaged pages: a one-line error in every reader and report, never a SIGBUS
    (exit 135), a raw lmdb.*Error traceback or a 'healthy' report."""
    store = damaged_copy(made, tmp_path / "store", kind, _offset(made, where), bit)
    for command, proc in run_commands(made, store, must_fail).items():
        assert proc.returncode >= 0 and proc.returncode != 128 + signal.SIGBUS, f"{command}: signal {proc.returncode}"
        assert "Traceback" not in proc.stderr, f"{command}: {proc.stderr[-3000:]}"
        assert_clear_failure(f"{name}: {command}", proc, open_current(store))


def test_the_checks_in_process(made: dict, tmp_path: Path) -> None:
    """check_version names size and meta damage; check_tree also a damaged leaf; old manifests (no lmdb
    block) still get the file-size and meta checks."""
    vdir = open_current(made["store"])
    assert check_tree(vdir) == check_version(vdir) == made["meta"]
    store = damaged_copy(made, tmp_path / "t", "truncate", made["meta"].page_size * 3)
    with pytest.raises(StoreDamagedError, match=r"has \d+ bytes, the manifest recorded \d+ \(the file was truncated\)"):
        check_version(open_current(store))
    import json

    old = open_current(store) / "manifest.json"
    manifest = json.loads(old.read_text())
    del manifest["lmdb"], manifest["stats"]["file_bytes"]
    old.write_text(json.dumps(manifest))
    with pytest.raises(StoreDamagedError, match="names pages up to .* the file was truncated"):
        check_version(open_current(store), user_id=7)
    leaf = damaged_copy(made, tmp_path / "l", "garbage", _offset(made, "leaf"))
    check_version(open_current(leaf))  # the cheap check does not read leaf pages
    with pytest.raises(StoreDamagedError, match="page"):
        check_tree(open_current(leaf))


def _score_in_child(made: dict, store: Path, out: Path) -> int:
    """Score every user of ``store`` as ``ckv score`` does by default (CRC-verified) in a forked child;
    the child writes "error<TAB>class<TAB>message" or the logits and cold-start flags (.npy) to ``out``.
    Returns the child's wait status (a signal shows as a negative exit code)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork(): run inline
        try:
            rt = DecodeRuntime.open(store, made["ckpt"], device="cpu", verify_crc=True)
            res = rt.score(made["users"], made["items"][:, None])
            np.save(out.with_suffix(".npy"), np.concatenate([res.logits[:, 0], res.cold_start.astype(np.float32)]))
        except Exception as exc:  # noqa: BLE001 - the parent judges which errors are clear
            out.write_text(f"error\t{type(exc).__name__}\t{exc}")
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


CLEAR = {"StoreDamagedError", "ChecksumError", "RecordSizeError", "BadMagicError", "UnsupportedVersionError",
         "UnknownDtypeError", "RecordError", "ModelVersionMismatchError", "RouterIndexError"}


@settings(max_examples=int(os.environ.get("CKV_FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["truncate", "zero", "garbage", "flip"]), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7))
def test_fuzz_page_damage(made: dict, tmp_path_factory: pytest.TempPathFactory, kind: str, where: float,
                          bit: int) -> None:
    """Damage at a random offset: a clear error (one line, a store/record error naming what to do) or the
    undamaged scores and cold-start flags exactly — never a signal, never a silently wrong score."""
    tmp = tmp_path_factory.mktemp("fuzz")
    size = (made["meta"].last_page + 1) * made["meta"].page_size
    store = damaged_copy(made, tmp / "store", kind, int(where * size), bit)
    status = _score_in_child(made, store, tmp / "out.txt")
    assert status == 0, f"child ended with {status} (negative: signal)"
    if (tmp / "out.txt").exists():
        _, cls, msg = (tmp / "out.txt").read_text().split("\t", 2)
        assert cls in CLEAR and "\n" not in msg, f"{cls}: {msg}"
        event(f"{kind}: clear error {cls}")
        return
    got = np.load(tmp / "out.npy", allow_pickle=False)
    ref = made["ref"]
    np.testing.assert_array_equal(got, np.concatenate([ref.logits[:, 0], ref.cold_start.astype(np.float32)]))
    event(f"{kind}: identical scores")


def test_score_verifies_crcs_by_default(made: dict, tmp_path: Path) -> None:
    """One flipped payload bit is never served with changed scores: `ckv score` CRC-checks
    by default (exit 1 naming the user); `--no-verify-crc` keeps the header/size-only fast path."""
    from click.testing import CliRunner

    from collectivekv.cachestore.store.reader import StoreReader
    from collectivekv.jobs.score import score as score_cmd

    store = tmp_path / "store"
    shutil.copytree(made["store"], store, symlinks=True)
    path = open_current(store) / "lmdb" / "data.mdb"
    with StoreReader(open_current(store)) as reader:
        raw = reader.get_raw(7)
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    data[at + 33] ^= 0x10  # a payload byte of user 7 (its user K part)
    path.write_bytes(bytes(data))
    args = ["--store", str(store), "--checkpoint", str(made["ckpt"]), "--requests", str(made["tmp"] / "req.csv"),
            "--out", str(tmp_path / "o.parquet"), "--device", "cpu"]
    r = CliRunner().invoke(score_cmd, args)
    assert r.exit_code == 1 and "user 7: CRC mismatch" in r.output, r.output
    r = CliRunner().invoke(score_cmd, [*args, "--no-verify-crc"])
    assert r.exit_code == 0, r.output
