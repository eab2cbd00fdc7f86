"""The project's import graph: no cycles, and the layering model ← cachestore ← jobs, pipeline ← jobs.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import x`` /
``from x import y`` anywhere in a module — at top level, inside functions and under
``if TYPE_CHECKING`` — is an edge from that module to the project module it names (``from pkg import
mod`` names ``pkg.mod`` when that is a module, else ``pkg``). Third-party imports are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "cachestore", "pipeline", "jobs")

def _module_name(path: Path) -> str:
    """``model/zoo.py`` → ``collectivekv.model.zoo`` (the installed namespace; pyproject.toml)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["collectivekv", *parts])


def _layer(module: str) -> str:
    """The top-level folder a module lies in: ``collectivekv.model.zoo`` → ``model``."""
    return module.split(".")[1]


def project_modules() -> dict[str, Path]:
    """Dotted name → source file of every module in the project's packages."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` is or lies in; None for a third-party name."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.AST, here: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            pkg = here if modules[here].name == "__init__.py" else here.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}" if base else pkg
        names = [f"{base}.{a.name}" for a in node.names] or [base]
    else:
        return []
    return [t for t in (_resolve(n, modules) for n in names) if t is not None and t != here]


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in its source)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {t for node in ast.walk(tree) for t in _targets(node, name, modules)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                path = [n for n, _ in stack]
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def _edges_into(graph: dict[str, set[str]], src_pkg: str, dst_pkgs: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(m, t) for m, ts in graph.items() if _layer(m) == src_pkg
            for t in ts if _layer(t) in dst_pkgs}


def test_graph_sees_function_level_and_package_imports() -> None:
    """The walker itself: function-level imports and ``from pkg import module`` are edges."""
    graph = import_graph()
    assert "collectivekv.cachestore.checkpoint" in graph["collectivekv.cachestore.decode.runtime"]  # in a method
    assert graph["collectivekv.model"] is not None and len(graph) > 50


def test_find_cycle_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_model_imports_no_other_layer() -> None:
    assert _edges_into(import_graph(), "model", ("cachestore", "pipeline", "jobs")) == set()


def test_cachestore_imports_no_pipeline_or_jobs() -> None:
    assert _edges_into(import_graph(), "cachestore", ("pipeline", "jobs")) == set()


def test_pipeline_imports_no_jobs() -> None:
    assert _edges_into(import_graph(), "pipeline", ("jobs",)) == set()


STORE_MODULES = tuple(f"collectivekv.cachestore.store.{m}" for m in (
    "record", "entry", "legacy_v1", "store_check", "store_tree", "reader", "lmdb_build", "publish", "layout_check"))


def test_store_format_and_lmdb_tools_need_no_torch() -> None:
    """The record format, the legacy reader and the LMDB build / publish / read / check tools import in a
    process where ``import torch`` fails."""
    import subprocess
    import sys

    from tests.helpers import repo_env

    code = "import sys; sys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in STORE_MODULES)
    code += "assert 'torch' not in {n.split('.')[0] for n, m in sys.modules.items() if m is not None}\n"
    proc = subprocess.run([sys.executable, "-c", code], env=repo_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
