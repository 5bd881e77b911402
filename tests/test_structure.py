"""The project's shape, read from its source (nothing is imported or run).

- Layers import only downward: ``profiles`` <- ``planner`` <- ``runtime`` <- the tools
  (``runtime.tools``: CLI and verify). Lazy imports inside functions count.
- No import cycles between modules.
- Private torch APIs appear only in ``profiles/_torch_private.py`` (and the parts it re-exports, ``_torch_private_*.py``).
- No function over 80 lines, no module over 500; every module states its job in a
  docstring and declares ``__all__``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("profiles", "planner", "runtime")
PRIVATE = ("torch._", "torch.utils._", "torch.multiprocessing.reductions", "kineto_results")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


def _layer(module: str) -> int:
    if module == "runtime.tools" or module.startswith("runtime.tools."):
        return 3
    return PACKAGES.index(module.split(".")[0])


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports, at any depth of its code."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def test_layers_import_only_downward():
    upward = [
        f"{a} imports {b}"
        for a, targets in EDGES.items()
        for b in targets
        if _layer(b) > _layer(a)
    ]
    assert upward == []


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert cycles == []


def test_private_torch_apis_only_in_torch_private():
    leaks = []
    for name, path in MODULES.items():
        if path.name.startswith("_torch_private"):  # _torch_private.py and the parts it re-exports
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0].replace("torch.__", "")
            if any(p in code for p in PRIVATE):
                leaks.append(f"{path.relative_to(ROOT)}:{i}: {code.strip()}")
    assert leaks == []


def test_functions_and_modules_are_small():
    big = []
    for path in MODULES.values():
        src = path.read_text()
        if len(src.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)} is {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {n} lines")
    assert big == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_states_its_job_and_exports(name):
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"
    if path.name == "__main__.py":
        return  # an entry point: nothing to export
    exports = [
        n for n in tree.body
        if (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets))
        or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "__all__")
    ]
    assert exports, f"{path.relative_to(ROOT)} has no __all__"


def test_the_checker_sees_every_package():
    """A guard for the tests above: they read real modules, with real edges."""
    assert {name.split(".")[0] for name in MODULES} == set(PACKAGES)
    assert sum(len(t) for t in EDGES.values()) > 20
    assert defaultdict(set, EDGES)["runtime.module"], "runtime.module imports nothing from the project?"
