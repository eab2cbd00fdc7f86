"""Size limits of the project's packages, benchmarks, scripts and tests, read with :mod:`ast` (nothing is
imported): no module over MAX_FILE_LINES lines, no function or method over MAX_FUNCTION_LINES lines (from its ``def``
line to its last line, docstring and nested functions included; decorators not counted)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "cachestore", "pipeline", "jobs", "benchmarks", "scripts", "tests")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def package_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def long_files(paths: list[Path], limit: int = MAX_FILE_LINES) -> dict[str, int]:
    """Relative path → line count of every file in `paths` over `limit` lines."""
    counts = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in paths}
    return {name: n for name, n in counts.items() if n > limit}


def function_lengths(source: str) -> dict[str, int]:
    """Qualified name (``Class.method``, ``outer.inner``) → lines of every function in `source`."""
    lengths: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = (child.end_lineno or child.lineno) - child.lineno + 1
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return lengths


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``path:function`` → lines of every function in `paths` over `limit` lines."""
    found: dict[str, int] = {}
    for path in paths:
        for name, n in function_lengths(path.read_text(encoding="utf-8")).items():
            if n > limit:
                found[f"{path.relative_to(ROOT)}:{name}"] = n
    return found


def test_function_lengths_sees_methods_and_nested_functions() -> None:
    source = ("class A:\n    def f(self):\n        def g():\n            pass\n        return g\n\n"
              "async def h():\n    pass\n")
    assert function_lengths(source) == {"A.f": 4, "A.f.g": 2, "h": 2}


def test_no_package_file_over_the_line_limit() -> None:
    assert long_files(package_files()) == {}


def test_no_function_over_the_line_limit() -> None:
    assert long_functions(package_files()) == {}
