"""The package's structure, as rules a change cannot quietly break: no import cycles (counting
imports inside functions), no module importing another's underscore-private names, and a core
(busi_monai) that knows nothing of the MONAI Label app."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"busi_monai": REPO / "busi_monai", "lib": REPO / "apps" / "busi" / "lib"}


def _modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every import in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out.append((target, [n for n in names if f"{target}.{n}" not in known], node.lineno))
            out += [(m, [], node.lineno) for m in submodules]
    return out


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_module_imports_another_modules_private_names(package):
    mods = _modules(package)
    bad = [
        f"{mods[m].relative_to(REPO)}:{line} takes {n} from {target}"
        for m in mods
        for target, names, line in _imports(m, mods[m], set(mods))
        if target in mods and target != m
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package):
    mods = _modules(package)
    graph = {m: {t for t, _, _ in _imports(m, p, set(mods)) if t in mods and t != m and not m.startswith(t + ".")} for m, p in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_core_does_not_import_the_app():
    mods = _modules("busi_monai")
    bad = [
        f"{p.relative_to(REPO)}:{line} imports {t}"
        for m, p in mods.items()
        for t, _, line in _imports(m, p, set(mods))
        if t and (t == "lib" or t.startswith(("lib.", "apps", "main")))
    ]
    assert not bad, "\n".join(bad)
