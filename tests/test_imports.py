"""The package's imports form a DAG in layers: core <- layers <- backbones, decoders <- models <- hub
(<- accel) <- toolkit (inference, export, viz, train, commands, cli). Read statically with ``ast``:
module-level and function-level imports alike."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1] / "semask"

# rank of each top-level part of the package; an import may only point at the same rank or below.
# Same-rank imports between different parts (backbones <-> decoders) are cycles waiting to happen:
# they are refused too, except inside one part.
RANKS = {
    "semask.version": 0,
    "semask.core": 1,  # registry (a leaf), safe readers, Hub downloads, model folders, HubMixin
    "semask.layers": 2, "semask.data": 2, "semask.losses": 2, "semask.metrics": 2,
    "semask.backbones": 3, "semask.decoders": 3,
    "semask.models": 4,
    "semask.hub": 5,  # the factory (create_model, from_pretrained), pretrained resolution, converter
    "semask.accel": 6,  # the opt-in inference layer (semask.optimize) works on built models
    "semask.inference": 7, "semask.export": 7, "semask.viz": 7,
    "semask.train": 8,
    "semask.commands": 9, "semask.cli": 10, "semask": 11,  # the package root re-exports everything
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """semask modules that ``name`` imports anywhere in its file (plus the packages they live in)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_pkg, node)
            # `from pkg import mod` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            if not (t == "semask" or t.startswith("semask.")):
                continue
            while t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            # importing a.b.c runs the __init__ of a.b too, unless the importer lives inside a.b (then
            # that package is already being imported; the root package always is)
            parts = t.split(".")
            for i in range(2, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in modules and mod != name and not name.startswith(mod + "."):
                    found.add(mod)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_imports.py RANKS; add it")
    return best


def _find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(n: str) -> List[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return []


def test_the_graph_sees_function_level_imports():
    # the walker must not miss imports inside functions (the ones that used to hide the cycle)
    graph = _graph()
    assert "semask.hub" in graph["semask.commands._common"]  # `from ..hub import from_pretrained` in a function
    assert "semask.core.registry" in graph["semask.backbones.swin"]


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_detector_finds_a_planted_cycle():
    graph = {k: set(v) for k, v in _graph().items()}
    graph["semask.core.registry"].add("semask.models.fpn")
    assert _find_cycle(graph)


def test_layer_order():
    wrong = []
    for name, deps in _graph().items():
        a = _part(name)
        for dep in deps:
            b = _part(dep)
            if RANKS[b] > RANKS[a] or (RANKS[b] == RANKS[a] and a != b and a != "semask"):
                wrong.append(f"{name} ({a}) imports {dep} ({b})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_registry_is_a_leaf():
    assert _graph()["semask.core.registry"] == set()
