"""Helpers shared by the tests: padded model batches (test_model.py, model/zoo_helpers.py) and the
spark-submit prefill command (test_prefill_spark.py, test_zoo_store.py, test_reliability_spark.py), the bundled
MovieLens prepared (the Spark prefill tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def padded_batch(
    lengths: torch.Tensor, width: int, g: torch.Generator, n_items: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random padded history batch in the model's layout: items (B, width), feedback (B, width)
    (0 at padding), ``lengths`` (B,) and one target item per row, drawn from ``g`` in that order."""
    b = len(lengths)
    items = torch.randint(1, n_items + 1, (b, width), generator=g)  # (B, L)
    feedback = torch.randint(1, 3, (b, width), generator=g)  # (B, L)
    pad = torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, L)
    items[pad] = 0
    feedback[pad] = 0
    targets = torch.randint(1, n_items + 1, (b,), generator=g)  # (B,)
    return items, feedback, lengths, targets


# the `ckv` command as a subprocess runs it (python -m: no console script needed)
CKV = [sys.executable, "-m", "collectivekv.jobs.cli"]


def repo_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that runs this checkout's code: the repository first on
    PYTHONPATH, whatever PYTHONPATH already held (e.g. carried packages) after it."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, **extra}


def prefill_submit_command(*job_args: str) -> tuple[list[str], dict[str, str]]:
    """``spark-submit --master local[2] jobs/prefill.py JOB_ARGS`` with the venv's spark-submit and
    Python: (command, environment)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYSPARK_PYTHON": sys.executable}  # fmt: skip
    cmd = [str(bin_dir / "spark-submit"), "--master", "local[2]", "--driver-memory", "1g",
           "--conf", "spark.ui.enabled=false", str(ROOT / "jobs" / "prefill.py"), *job_args]  # fmt: skip
    return cmd, env


def run_prefill_submit(*job_args: str) -> subprocess.CompletedProcess:
    """Run :func:`prefill_submit_command` to completion (5 min limit); it must succeed."""
    cmd, env = prefill_submit_command(*job_args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def prepare_movielens(out: Path) -> Path:
    """The bundled MovieLens prepared by `ckv data prepare` (ratings + movies) into ``out``."""
    from click.testing import CliRunner

    from collectivekv.jobs.prepare import data as data_cli

    movielens = ROOT / "data" / "movielens"
    r = CliRunner().invoke(data_cli, ["prepare", "--events", str(movielens / "ratings.csv"), "--items",
                                      str(movielens / "movies.csv"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out
