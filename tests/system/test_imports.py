"""The package layering: every module imports on its own, no import cycle between modules, and
imports point one way only (pipeline -> stages -> store; the demo uses them, they never use it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "store")
# what each package may import among the checkout's top-level packages (itself always)
ALLOWED = {"store": set(), "stages": {"store"}, "pipeline": {"stages", "store"}}
OURS = {*PACKAGES, "demo", "tests", "bench"}


def module_files(*packages: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given packages."""
    out = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports (at module level, in functions or under TYPE_CHECKING), resolved to
    the most specific known module; absolute names outside the checkout are kept as they are."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Edges between the modules of pipeline, stages and store, plus edges to other top-level names."""
    files = module_files(*PACKAGES)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own nodes, as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    # imports inside functions count too: a cycle deferred into a function is still a cycle
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_imports_point_one_way():
    bad = []
    for module, deps in import_graph().items():
        pkg = module.split(".")[0]
        for dep in deps:
            top = dep.split(".")[0]
            if top in OURS and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{module} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


def test_stages_imports_are_absolute():
    # one convention per package: stages spells `from stages.x import ...` (store stays relative)
    relative = [f"{name}:{node.lineno}" for name, path in module_files("stages").items()
                for node in ast.walk(ast.parse(path.read_text(), str(path)))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, relative


def test_the_graph_sees_cycles_and_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "x"}, "b": set()}) is None
    graph = import_graph()
    assert "store.errors" in graph["store.signal"]  # `from .errors import StoreError`
    assert "stages.grads.adam_state" in graph["stages.grads.optim_layouts"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    # each module is imported with none of the three packages loaded yet (third-party modules stay,
    # for speed), so a cycle that only an import order hides fails here
    names = sorted(module_files(*PACKAGES))
    script = (
        "import importlib, sys, traceback\n"
        f"names, ours, failed = {names!r}, {PACKAGES!r}, []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ours]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ':\\n' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
