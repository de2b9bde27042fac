"""The house rules of the package, read from the source: which room may import which, no import cycle, and no
function-local import of fxquant (the usual way to hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# module name -> file; passes/ is imported as fxquant.passes
FILES: dict[str, Path] = {}
for folder, package in ((ROOT / "fxquant", "fxquant"), (ROOT / "passes", "fxquant.passes")):
    for path in folder.rglob("*.py"):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        FILES[".".join([package, *parts])] = path

FACE = ("fxquant.api", "fxquant.cli", "fxquant.workflow", "fxquant.checkpoint", "fxquant.summary")
# room -> the only fxquant modules it may import (beyond itself)
ALLOWED = {
    "fxquant.quant": ("fxquant.errors",),
    "fxquant.config": ("fxquant.errors", "fxquant.quant"),
    "fxquant.passes": ("fxquant.errors", "fxquant.quant", "fxquant.config"),
}
# room -> what it must never import
FORBIDDEN = {
    "fxquant.train": (*FACE, "fxquant.search", "fxquant.zeroshot", "fxquant.deploy"),
    "fxquant.search": (*FACE, "fxquant.zeroshot", "fxquant.deploy"),
    "fxquant.zeroshot": (*FACE, "fxquant.search", "fxquant.deploy"),
    "fxquant.deploy": (*FACE, "fxquant.train", "fxquant.search", "fxquant.zeroshot"),
    "fxquant.qat_model": (*FACE, "fxquant.train", "fxquant.search", "fxquant.zeroshot", "fxquant.deploy"),
}


def _is_package(name: str) -> bool:
    return FILES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(fxquant modules imported at module level, (line, module) of imports inside functions)."""
    tree = ast.parse(FILES[module].read_text(encoding="utf-8"))
    top: set[str] = set()
    local: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # typing only, never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = []
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                else:
                    source = _resolve(module, child)
                    names = [f"{source}.{a.name}" if f"{source}.{a.name}" in FILES else source for a in child.names]
                for name in names:
                    if name == "fxquant" or name.startswith("fxquant."):
                        (local.append((child.lineno, name)) if in_function else top.add(name))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, local


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_fxquant_import_inside_a_function():
    found = [f"{FILES[m].relative_to(ROOT)}:{line} imports {name}" for m in FILES for line, name in imports(m)[1]]
    assert not found, "function-local imports (hide an import cycle, or belong at the top):\n" + "\n".join(found)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_lower_rooms_import_only_what_is_below_them(room):
    bad = []
    for module in (m for m in FILES if _room(m) == room):
        for name in imports(module)[0]:
            if _room(name) != room and not name.startswith(ALLOWED[room]):
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_never_import_the_face_or_rooms_above(room):
    bad = [
        f"{module} imports {name}"
        for module in FILES
        if _room(module) == room
        for name in imports(module)[0]
        if name.startswith(FORBIDDEN[room])
    ]
    assert not bad, "\n".join(bad)


def _edges(module: str) -> set[str]:
    """What importing ``module`` executes first: each import, and for an import from another package, that
    package's ``__init__`` (the root package is always initialised first, so it is not an edge)."""
    out = set()
    own_package = module if _is_package(module) else module.rpartition(".")[0]
    for name in imports(module)[0]:
        target = name if name in FILES else name.rpartition(".")[0]
        if target in FILES and target != module:
            out.add(target)
        parent = target.rpartition(".")[0]
        while parent and parent != "fxquant" and not own_package.startswith(parent):
            if parent in FILES and parent != module:
                out.add(parent)
            parent = parent.rpartition(".")[0]
    return out


def test_there_is_no_import_cycle():
    graph = {module: _edges(module) for module in FILES if module != "fxquant"}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_cycles_and_local_imports(tmp_path, monkeypatch):
    """The rules above are not vacuous: a planted cycle and a planted local import are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from fxquant.fake_b import x\n\ndef f():\n    from fxquant.fake_b import y\n")
    b.write_text("from fxquant.fake_a import z\n")
    monkeypatch.setitem(FILES, "fxquant.fake_a", a)
    monkeypatch.setitem(FILES, "fxquant.fake_b", b)
    assert imports("fxquant.fake_a")[1] == [(4, "fxquant.fake_b")]
    with pytest.raises(AssertionError, match="import cycle"):
        test_there_is_no_import_cycle()
