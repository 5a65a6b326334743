"""No import cycles in the three packages (``twilight``, ``twilight_eval``, ``twilight_bench``), and every module
imports on its own.

The graph counts every import, at module level or inside a function (a lazy import that goes back to its importer is
a cycle too, only hidden), except those under ``if TYPE_CHECKING:``; importing a package's submodule is an edge to
the submodule, not to the package (Python initialises a package before its submodules, as it must)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"twilight": "twilight", "twilight_eval": "eval", "twilight_bench": "benchmarks"}


def _modules() -> dict[str, str]:
    """``{dotted name: path}`` of every module of the packages."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if d not in ("results", "__pycache__", "data")]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    mods[".".join([pkg, *rel])] = os.path.join(dirpath, f)
    return mods


def _imports(name: str, path: str, mods: dict[str, str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its source."""
    is_package = path.endswith("__init__.py")
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(open(path, encoding="utf-8").read())]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds this module
                parts = name.split(".")[:None if is_package else -1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = {f"{base}.{a.name}" for a in node.names}
            submodules = names & set(mods)
            found |= submodules if submodules else {base}
        else:
            stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in mods and m != name and not name.startswith(m + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    mods = _modules()
    assert {"twilight.contract", "twilight_eval.common", "twilight_bench.e2e"} <= set(mods)
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert graph["twilight.integrations.hf.patching"] >= {"twilight.pipeline", "twilight.integrations.hf.compat"}
    cycles = _cycles(graph)
    assert not cycles, "import cycles (each line: modules that import each other, directly or not): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_every_module_imports_on_its_own():
    """Each module imported first, into an interpreter holding none of the packages' modules."""
    code = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("twilight", "twilight_eval", "twilight_bench")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    run = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
