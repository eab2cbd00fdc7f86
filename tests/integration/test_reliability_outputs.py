"""Outputs are written safely (pipeline/store/safe_output.py): `ckv data prepare`, `ckv train` and
`ckv experiment` never delete a directory they did not write (their own input, a foreign file),
replace their own kind only with --overwrite and atomically, and concurrent `ckv score` runs with one
--out never share a temp file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import collectivekv.pipeline.data.prepare as prepare_mod
from collectivekv.jobs.cli import main
from collectivekv.pipeline.store.safe_output import OutputError, replace_file
from tests.helpers import CKV, repo_env
from tests.pipeline.training.test_training import TINY

ROOT = Path(__file__).resolve().parents[2]


def _events(root: Path, users: int = 30) -> Path:
    rng = np.random.default_rng(0)
    rows = [(u + 1, int(rng.integers(1, 41)), float(rng.integers(1, 6)), 1000 * e + u)
            for u in range(users) for e in range(20)]
    path = root / "ratings.csv"
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(path, index=False)
    return path


def _prepare(events: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(events), "--out", str(out), *extra])
    return res.exit_code, res.output


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_refuses_the_folder_of_its_input_and_a_foreign_folder(tmp_path: Path) -> None:
    events = _events(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    code, out = _prepare(events, tmp_path)  # --out is the folder holding the input
    assert code == 1 and "contains the input" in out and str(events) in out
    assert _tree(tmp_path) == before
    code, out = _prepare(events, events)  # --out is the input itself
    assert code == 1 and "is the input" in out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.csv").write_text("x")
    code, out = _prepare(events, foreign)
    assert code == 1 and "not empty and not a dataset" in out and "keep.csv" in out and "nothing was deleted" in out
    assert (foreign / "keep.csv").read_text() == "x" and _tree(tmp_path) == {**before, "foreign/keep.csv": b"x"}


def test_prepare_overwrite_replaces_its_own_kind_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _events(tmp_path)
    out = tmp_path / "data"
    assert _prepare(events, out)[0] == 0
    first = _tree(out)
    code, msg = _prepare(events, out)  # its own kind, no --overwrite
    assert code == 1 and "pass --overwrite" in msg and _tree(out) == first
    code, msg = _prepare(events, out, "--overwrite", "--valid-frac", "0.2")
    assert code == 0, msg
    assert '"split_fractions": [\n    0.7' in (out / "meta.json").read_text() and _tree(out) != first
    second = _tree(out)

    def broken(*args: object, **kw: object) -> None:  # the disk fails half-way through the write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_mod.pq, "write_table", broken)
    with pytest.raises(OSError):
        prepare_mod.prepare(prepare_mod.PrepareConfig(events=events, out=out, rating_col="rating",
                                                      rating_threshold=4.0, overwrite=True))
    assert _tree(out) == second  # the old dataset, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_prepare_refuses_a_dataset_holding_foreign_files_even_with_overwrite(tmp_path: Path) -> None:
    events = _events(tmp_path)
    out = tmp_path / "data"
    assert _prepare(events, out)[0] == 0
    (out / "my_notes.md").write_text("do not delete")
    code, msg = _prepare(events, out, "--overwrite")
    assert code == 1 and "my_notes.md" in msg and (out / "my_notes.md").read_text() == "do not delete"
    (out / "my_notes.md").unlink()  # below the dataset's own folders too: samples/ holds its split files only
    (out / "samples" / "runs").mkdir()
    (out / "samples" / "runs" / "result.csv").write_text("mine")
    code, msg = _prepare(events, out, "--overwrite")
    assert code == 1 and "samples/runs/result.csv" in msg and "nothing was deleted" in msg
    assert (out / "samples" / "runs" / "result.csv").read_text() == "mine"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    assert _prepare(_events(root), root / "data")[0] == 0
    return root / "data"


def _train(data: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), *TINY, "--epochs", "1", *extra])
    return res.exit_code, res.output


def test_train_refuses_its_input_and_foreign_folders_then_overwrites_its_own(data: Path, tmp_path: Path) -> None:
    before = _tree(data)
    code, msg = _train(data, data)  # the dataset folder itself
    assert code == 1 and "is the input" in msg and _tree(data) == before
    code, msg = _train(data, data.parent)  # a folder holding the dataset
    assert code == 1 and "contains the input" in msg and _tree(data) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.pdf").write_bytes(b"%PDF")
    code, msg = _train(data, foreign)
    assert code == 1 and "report.pdf" in msg and (foreign / "report.pdf").read_bytes() == b"%PDF"
    ckpt = tmp_path / "ckpt"
    assert _train(data, ckpt)[0] == 0
    first = _tree(ckpt)
    code, msg = _train(data, ckpt, "--seed", "1")
    assert code == 1 and "pass --overwrite" in msg and _tree(ckpt) == first
    code, msg = _train(data, ckpt, "--seed", "1", "--overwrite")
    assert code == 0, msg
    assert _tree(ckpt) != first and sorted(_tree(ckpt)) == sorted(first)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_experiment_refuses_a_foreign_folder_before_training(data: Path, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    res = CliRunner().invoke(main, ["experiment", "--data", str(data), "--out", str(tmp_path), *TINY])
    assert res.exit_code == 1 and "x.txt" in res.output and (tmp_path / "x.txt").read_text() == "x"


def test_replace_file_gives_overlapping_writers_their_own_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "scores.parquet"
    with replace_file(target) as a, replace_file(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        pq.write_table(pa.table({"x": [1, 2]}), a)
        pq.write_table(pa.table({"x": [3]}), b)
    assert pq.read_table(target).column("x").to_pylist() == [1, 2]  # the last to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]
    with pytest.raises(OutputError, match="is the input"), replace_file(target, inputs=(target,)):
        pass


# ------------------------------------------------------------------------------------------- ckv score
@pytest.fixture()
def scoring(tmp_path: Path) -> dict:
    """A small store + checkpoint (the prefill tests' model) and 40,000 request rows."""
    from collectivekv.pipeline.prefill.prefill import cache_layout
    from collectivekv.pipeline.store.store_ops import build_store
    from collectivekv.pipeline.training.checkpoint import save_checkpoint
    from tests.pipeline.prefill.prefill_helpers import histories, make_model, small_config, write_prefill

    model = make_model(small_config())
    version = save_checkpoint(tmp_path / "ckpt", model, {})
    build_store(tmp_path / "store", write_prefill(tmp_path, model, cache_layout(model.cfg, version),
                                                  [histories([5] * 30, first_user=0)]), command_line="t")
    g = np.random.default_rng(0)
    req = tmp_path / "requests.parquet"
    n = 40_000
    pq.write_table(pa.table({"user_id": g.integers(0, 40, n), "item_id": g.integers(1, 20, n)}), req,
                   row_group_size=2_000)
    return {"store": tmp_path / "store", "ckpt": tmp_path / "ckpt", "req": req, "rows": n}


def _score_args(s: dict, out: Path) -> list[str]:
    return ["score", "--store", str(s["store"]), "--checkpoint", str(s["ckpt"]), "--requests", str(s["req"]),
            "--out", str(out), "--device", "cpu", "--chunk-rows", "2000", "--batch-users", "8"]


def test_score_refuses_out_equal_to_requests(scoring: dict) -> None:
    before = scoring["req"].read_bytes()
    res = CliRunner().invoke(main, _score_args(scoring, scoring["req"]))
    assert res.exit_code == 1 and "is the input" in res.output
    assert scoring["req"].read_bytes() == before


def test_score_refuses_out_inside_its_store_or_checkpoint(scoring: dict) -> None:
    from collectivekv.cachestore.store.publish import open_current

    for target in (scoring["ckpt"] / "weights.safetensors", open_current(scoring["store"]) / "manifest.json"):
        before = target.read_bytes()
        res = CliRunner().invoke(main, _score_args(scoring, target))
        assert res.exit_code == 1 and "is inside" in res.output and target.read_bytes() == before


def test_score_refuses_ids_that_are_no_keys_naming_the_row(scoring: dict, tmp_path: Path) -> None:
    for column, values, message in (("user_id", pa.array([3, -7], pa.int64()), "ids are integers 0..2^63-1, got -7"),
                                    ("user_id", pa.array([3, 2**63 + 5], pa.uint64()), "got 9223372036854775813"),
                                    ("item_id", pa.array([1, 0], pa.int64()), "row 2: item_id 0 is not a dense")):
        cols = {"user_id": pa.array([3, 4], pa.int64()), "item_id": pa.array([1, 2], pa.int64()), column: values}
        pq.write_table(pa.table(cols), tmp_path / "req.parquet")
        args = _score_args({**scoring, "req": tmp_path / "req.parquet"}, tmp_path / "out.parquet") + ["--dense-ids"]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and message in res.output, res.output
        assert not (tmp_path / "out.parquet").exists()


def test_two_scores_with_one_out(scoring: dict, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    env = repo_env()
    cmd = [*CKV, *_score_args(scoring, out)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    for code, _, err in results:  # each succeeds, or fails in one clear line
        assert code == 0 or (code == 1 and err.count("\n") == 1 and "Traceback" not in err), err[-3000:]
    assert any(code == 0 for code, _, _ in results)
    table = pq.read_table(out)
    assert table.num_rows == scoring["rows"] and table.column_names[-3:] == ["logit", "score", "cold_start"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_refresh_refuses_a_work_or_store_folder_holding_its_input(tmp_path: Path) -> None:
    events = _events(tmp_path)
    before = _tree(tmp_path)
    for option in ("--work", "--store"):
        other = "--store" if option == "--work" else "--work"
        res = CliRunner().invoke(main, ["refresh", option, str(tmp_path), other, str(tmp_path / "elsewhere"),
                                        "--events", str(events)])
        assert res.exit_code == 1 and f"{option} {tmp_path} contains the input" in res.output, res.output
    assert _tree(tmp_path) == before


def test_out_under_a_file_a_symlink_or_the_current_directory_is_refused_first(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    events = _events(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    code, msg = _prepare(events, tmp_path / "notes.txt" / "ds")
    assert code == 1 and "notes.txt is a file, not a directory" in msg
    os.symlink(tmp_path / "missing", tmp_path / "link")
    code, msg = _prepare(events, tmp_path / "link")
    assert code == 1 and "is a symbolic link" in msg and os.readlink(tmp_path / "link") == str(tmp_path / "missing")
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    code, msg = _prepare(events, Path("."))
    assert code == 1 and "is the current directory" in msg and here.is_dir()
