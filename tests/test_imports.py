"""The import graph of ``value_pl``: no cycles, and imports only go down the layers.

Layers (low to high): the package root (constants) -> ``data`` (what a run reads) -> ``backbones``,
``datasets`` (builders) -> ``probers``, ``analysis`` -> ``protocols`` -> ``driver``, ``report`` ->
``compare`` -> ``callbacks`` -> the entry points (``train``, ``eval``, ``extract``, ``analyze`` and the
packages' ``__main__``). Every import counts, also the ones inside functions. Walked with ``ast``.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "value_pl"

LAYERS = {
    "value_pl": 0,
    "data": 1,
    "backbones": 2, "datasets": 2,
    "probers": 3, "analysis": 3,
    "protocols": 4,
    "driver": 5, "report": 5,
    "compare": 6,
    "callbacks": 7,
    "train": 8, "eval": 8, "extract": 8, "analyze": 8,
}
ENTRY = 8


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Modules of the package that ``name`` imports (``from x import y`` counts y when y is a module)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def layer(mod: str) -> int:
    parts = mod.split(".")
    if parts[-1] == "__main__":
        return ENTRY
    if len(parts) == 1:
        return LAYERS["value_pl"]
    return LAYERS[parts[1]]


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return cycles


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m.split(".")[-1] != "__main__" and len(m.split(".")) > 1
               and m.split(".")[1] not in LAYERS]
    assert not missing, f"add these packages/modules to LAYERS: {missing}"


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_only_go_down():
    up = []
    for m, deps in graph().items():
        for d in deps:
            same_package = m.split(".")[:2] == d.split(".")[:2]
            if not same_package and layer(d) >= layer(m):
                up.append(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})")
    assert not up, "imports that do not go down:\n" + "\n".join(sorted(up))


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert layer("value_pl.data.schema") < layer("value_pl.driver.setup")


def test_every_file_says_what_it_holds():
    """Each module opens with a docstring, and files stay short or are one idea (checked by hand above ~400)."""
    for m, p in modules().items():
        tree = ast.parse(p.read_text())
        if p.name == "__init__.py" and not tree.body:
            continue
        assert ast.get_docstring(tree), f"{p} has no module docstring"
