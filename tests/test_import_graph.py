"""The package's import graph, read from the source (ast): no cycles, imports point one way
(``dynconv`` -> ``dynconv.backends`` -> ``dynconv.kernels``; ``dynconv.autotune`` -> all), and
``import dynconv`` does not import Triton.

Every ``import`` / ``from ... import`` counts, at module level or inside a function: a
function-level import only postpones a cycle to the first call.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (setuptools package-dir).
SOURCES = {"dynconv": "dynconv", "kernels": "dynconv.kernels", "autotune": "dynconv.autotune"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed package."""
    modules = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules) -> list[str]:
    """Every absolute dotted name ``module`` imports, anywhere in ``tree``.

    ``from X import y`` imports the module X.y if there is one (``modules``), else the name y
    of X. Relative imports resolve against ``module``'s package.
    """
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.append(submodule if submodule in modules else source)
    return names


def _resolve(name: str, modules) -> str | None:
    """The module of ours that importing ``name`` loads (its longest known prefix), if any."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports() -> dict[str, set[str]]:
    """Module -> every absolute name it imports, anywhere in its source (ours and others')."""
    modules = module_files()
    found = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        found[module] = set(_imported_names(tree, module, path.name == "__init__.py", modules))
    return found


def import_graph(imported: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports.

    An import of a.b.c is an edge to a.b.c only, not to the packages a and a.b that Python
    initialises on the way (every submodule would otherwise "import" its own package).
    """
    return {module: {_resolve(name, imported) for name in names} - {None, module}
            for module, names in imported.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state = {}  # node -> "active" (on the current path) or "done"
    for start in sorted(graph):
        if start in state:
            continue
        path, iterators = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = "active"
        while path:
            nxt = next(iterators[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                iterators.pop()
            elif state.get(nxt) == "active":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "active"
                path.append(nxt)
                iterators.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


KERNELS, BACKENDS, AUTOTUNE = "dynconv.kernels", "dynconv.backends", "dynconv.autotune"
# The dispatcher: dynamic_conv2d (functional), the nn.Modules, and the package __init__ that
# re-exports them.
DISPATCHER = ("dynconv", "dynconv.functional", "dynconv.modules")
# Autograd and module machinery that kernels (Triton and thin launchers) have no use for.
AUTOGRAD_LEVEL = ("torch.autograd", "torch.library", "torch.nn")


def violations(graph: dict[str, set[str]], imported: dict[str, set[str]] | None = None):
    """Every import that breaks the direction rules, as 'importer -> imported: why'.

    - dynconv.backends never imports the dispatcher (DISPATCHER);
    - dynconv.kernels imports nothing of the library outside dynconv.kernels (no backend,
      dispatcher, module, autograd glue or tool) and nothing of AUTOGRAD_LEVEL;
    - nothing outside dynconv.autotune imports dynconv.autotune;
    - nobody imports the folders ``kernels`` / ``autotune`` as top-level packages (a PyPI
      package is called ``kernels``): they are dynconv.kernels / dynconv.autotune.
    """
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _under(module, BACKENDS) and target in DISPATCHER:
                found.append(f"{module} -> {target}: backends never import the dispatcher")
            if _under(module, KERNELS) and not _under(target, KERNELS):
                found.append(f"{module} -> {target}: kernels import only dynconv.kernels")
            if _under(target, AUTOTUNE) and not _under(module, AUTOTUNE):
                found.append(f"{module} -> {target}: only the tools import dynconv.autotune")
    for module, names in sorted((imported or {}).items()):
        for name in sorted(names):
            if _under(module, KERNELS) and any(_under(name, p) for p in AUTOGRAD_LEVEL):
                found.append(f"{module} -> {name}: kernels know nothing of autograd")
            if name.split(".")[0] in ("kernels", "autotune"):
                found.append(f"{module} -> {name}: import it as dynconv.{name}")
    return found


@pytest.fixture(scope="module")
def imported():
    return imports()


@pytest.fixture(scope="module")
def graph(imported):
    return import_graph(imported)


def test_graph_covers_the_package(graph):
    for module in ("dynconv", "dynconv.functional", "dynconv.backends.registry",
                   "dynconv.backends.native.op", "dynconv.backends.triton.op",
                   "dynconv.kernels.mix", "dynconv.autotune.bench", "dynconv.train.loop"):
        assert module in graph, module
    # Relative and absolute imports both resolve to modules of the package.
    assert "dynconv.backends.registry" in graph["dynconv.functional"]
    assert any(_under(t, "dynconv.kernels") for t in graph["dynconv.backends.registry"])


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_one_way(graph, imported):
    assert violations(graph, imported) == []


def test_the_checks_can_fail():
    """The cycle finder and the direction rules on synthetic graphs."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    bad = {
        "dynconv.backends.native.op": {"dynconv.functional", "dynconv"},
        "dynconv.kernels.mix": {"dynconv.backends.custom_op", "dynconv.geometry"},
        "dynconv.functional": {"dynconv.autotune.measure"},
        "dynconv.autotune.bench": {"dynconv.functional", "dynconv.kernels.mix"},
    }
    raw = {"dynconv.kernels.mix": {"torch.autograd.Function", "triton"},
           "dynconv.backends.triton.op": {"kernels.mix"}}
    assert len(violations(bad, raw)) == 7, violations(bad, raw)
    # An import inside a function counts, and relative imports resolve against the package.
    tree = ast.parse("def f():\n    from ...kernels import mix\n    from . import op, x\n")
    modules = {"dynconv.kernels.mix", "dynconv.backends.triton.op"}
    names = _imported_names(tree, "dynconv.backends.triton", True, modules)
    assert sorted(names) == ["dynconv.backends.triton", "dynconv.backends.triton.op",
                             "dynconv.kernels.mix"]


def test_import_dynconv_does_not_import_triton():
    code = "import sys, dynconv; assert 'triton' not in sys.modules, 'triton was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
