"""The folders import downward only, no two files import each other, and core is torch-free.

Layers, lowest first: core < kernels < launch < sweeper < analysis < hydra_plugins < benchmarks.
A module may import its own folder or a lower one (issue 15). Every `import` counts,
top-level and inside functions alike: a lazy import still ties the two files together.
The checker reads the source with `ast` (nothing is imported); a subprocess then imports
every core and sweeper module and checks that torch was never loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("core", "kernels", "launch", "sweeper", "analysis", "hydra_plugins", "benchmarks")
HEAVY = ("torch", "triton", "megatron")  # what core must never import

# Known edges not yet fixed, (importer, imported), each with who removes it. Shrinks to empty.
ALLOWED: set[tuple[str, str]] = set()


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the layer folders (packages as their __init__)."""
    names = {}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load: `from a import b` may mean module a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_edges(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported project module or third-party top name: first line number}."""
    names = module_names(root)
    edges: dict[str, dict[str, int]] = {}
    for module, path in names.items():
        found = edges.setdefault(module, {})
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                target = name
                while target and target not in names:  # the deepest project module named
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.setdefault(target, node.lineno)
                elif not target and name.split(".")[0] in HEAVY:
                    found.setdefault(name.split(".")[0], node.lineno)
    return edges


def layer_of(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def upward_imports(edges) -> list[str]:
    """'a.b:12 imports c.d (layer x above y)' for each import of a higher layer."""
    found = []
    for module, targets in sorted(edges.items()):
        for target, line in sorted(targets.items()):
            if target.split(".")[0] in LAYERS and layer_of(target) > layer_of(module):
                if (module, target) not in ALLOWED:
                    found.append(f"{module}:{line} imports {target} "
                                 f"({LAYERS[layer_of(target)]} is above {LAYERS[layer_of(module)]})")
    return found


def cycles(edges) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of project modules."""
    graph = {m: sorted(t for t in ts if t in edges and (m, t) not in ALLOWED) for m, ts in edges.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; the graph has a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, group) for group in groups]


def _one_cycle(graph, group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in graph[path[-1]]:
            if w == start:
                return path + [start]
            if w in members and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle in strongly connected group {group}")


def heavy_in_core(edges) -> list[str]:
    return [f"{module}:{line} imports {target}" for module, targets in sorted(edges.items())
            if module.split(".")[0] == "core" for target, line in sorted(targets.items())
            if target in HEAVY]


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(import_edges(REPO))
    assert not problems, "imports of a higher layer:\n  " + "\n  ".join(problems)


def test_no_import_cycle_between_files():
    found = cycles(import_edges(REPO))
    assert not found, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in found)


def test_core_imports_no_torch_triton_or_megatron():
    problems = heavy_in_core(import_edges(REPO))
    assert not problems, "core must stay torch-free:\n  " + "\n  ".join(problems)


def test_core_and_sweeper_import_without_loading_torch():
    modules = [m for m in module_names(REPO) if m.split(".")[0] in ("core", "sweeper")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'torch' not in sys.modules, f'importing {m} loaded torch'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]


def test_allow_list_names_only_edges_that_exist():
    # An edge fixed upstream must leave the allow-list too, or it would hide a regression.
    edges = import_edges(REPO)
    stale = sorted(edge for edge in ALLOWED if edge[1] not in edges.get(edge[0], {}))
    assert not stale, f"allow-listed edges that no longer exist: {stale}"


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_a_planted_upward_import_cycle_and_torch(tmp_path):
    # The negative control: the same checker on a tree with one fault of each kind.
    _write(tmp_path, "core/__init__.py", "")
    _write(tmp_path, "core/base.py", "import json\n")
    _write(tmp_path, "core/heavy.py", "def f():\n    import torch.nn\n")
    _write(tmp_path, "sweeper/__init__.py", "")
    _write(tmp_path, "sweeper/plan.py", "from core import base\n")
    _write(tmp_path, "launch/__init__.py", "")
    _write(tmp_path, "launch/up.py", "def f():\n    from sweeper.plan import x\n")  # upward, lazily
    _write(tmp_path, "launch/a.py", "from . import b\n")  # a -> b -> a, relative import
    _write(tmp_path, "launch/b.py", "import launch.a\nfrom core.base import y\n")
    edges = import_edges(tmp_path)
    assert upward_imports(edges) == ["launch.up:2 imports sweeper.plan (sweeper is above launch)"]
    assert cycles(edges) == [["launch.a", "launch.b", "launch.a"]]
    assert heavy_in_core(edges) == ["core.heavy:2 imports torch"]
    # and the clean part of the tree passes
    for bad in ("launch/up.py", "launch/a.py", "core/heavy.py"):
        (tmp_path / bad).unlink()
    edges = import_edges(tmp_path)
    assert (upward_imports(edges), cycles(edges), heavy_in_core(edges)) == ([], [], [])
