"""The package's shape, checked from its source: no import cycle among its modules
(imports inside functions count too), and no module reaching for another module's
underscore names (a name another module needs is not private)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "jax_mscclpp_ep"
EXTENSIONS = {"_ep"}  # the compiled module, imported once (native.py) and renamed there


def _modules():
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


def _sibling_imports(tree):
    """[(module, names imported from it)] for every relative import in the tree."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .mod import a, b
                out.append((node.module.split(".")[0], [a.name for a in node.names]))
            else:            # from . import mod
                out.extend((a.name, []) for a in node.names)
    return out


def test_no_import_cycle():
    mods = _modules()
    graph = {m: sorted({dep for dep, _ in _sibling_imports(t) if dep in mods and dep != m})
             for m, t in mods.items()}
    graph.pop("__init__")  # the package's face imports everything and nothing imports it
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for dep in graph[m]:
            visit(dep, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


@pytest.mark.parametrize("name", sorted(p.stem for p in PKG.glob("*.py")))
def test_no_underscore_name_crosses_modules(name):
    tree = _modules()[name]
    siblings = {p.stem for p in PKG.glob("*.py")}
    bad = []
    for dep, names in _sibling_imports(tree):
        if dep.startswith("_") and dep not in EXTENSIONS and dep != "__init__":
            bad.append(f"imports module {dep}")
        bad += [f"from .{dep} import {n}" for n in names if n.startswith("_")]
    imported = {a.asname or a.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module
                for a in node.names}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in imported and node.value.id in siblings):
            bad.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    if name != "native":
        bad += [f"imports the compiled module {d}" for d, _ in _sibling_imports(tree)
                if d in EXTENSIONS]
    assert not bad, f"{name}.py: " + "; ".join(bad)
