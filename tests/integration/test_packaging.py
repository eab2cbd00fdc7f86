"""The installed package: one top-level name (``collectivekv``), every module of the four folders inside it,
and the CLI importable from the wheel alone (not from the repository)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("model", "pipeline", "cachestore", "jobs")


def _packages_on_disk() -> set[str]:
    found = {"collectivekv"}
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join(["collectivekv", *init.parent.relative_to(ROOT).parts]))
    return found


def test_pyproject_lists_every_package() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(tool["packages"]) == _packages_on_disk()
    assert tool["package-dir"] == {"collectivekv": "collectivekv", **{f"collectivekv.{f}": f for f in FOLDERS}}


def test_wheel_holds_one_namespace_and_runs_without_the_repository(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("collectivekv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"collectivekv", wheel.name.split("-")[0] + "-"
                                                + wheel.name.split("-")[1] + ".dist-info"}
    sources = {f"collectivekv/{p.relative_to(ROOT)}" for f in FOLDERS for p in (ROOT / f).rglob("*.py")}
    assert sources <= set(names)
    assert "collectivekv/pipeline/prefill/spark-log4j2.properties" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys\n"  # drop the editable install's finder and the repository from the path
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            f"sys.path[:] = [{str(site)!r}] + [p for p in sys.path if p not in ('', '.', {str(ROOT)!r})]\n"
            "import importlib.util, collectivekv.jobs.cli, collectivekv.cachestore.store.reader\n"
            f"assert collectivekv.jobs.cli.__file__.startswith({str(site)!r}), collectivekv.jobs.cli.__file__\n"
            "assert all(importlib.util.find_spec(n) is None for n in ('model', 'pipeline', 'cachestore', 'jobs'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
