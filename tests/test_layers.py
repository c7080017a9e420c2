"""The package's layers: every module imports only from its own layer or the ones below it, so the
folder listing is the architecture (io → model → cache → train → evaluation → cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import embedcache

#: Layer of each top-level part of the package; a module may import parts of its own layer or lower.
LAYERS = {"errors": 0, "io": 1, "runtime": 1, "config": 2, "model": 3, "cache": 4, "train": 5, "evaluation": 6,
          "cli": 7, "__main__": 7}
ROOT = Path(embedcache.__file__).parent


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embedcache"):
            yield node.module if node.module != "embedcache" else None, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("embedcache."):
                    yield alias.name, [], node.lineno


def test_no_module_imports_from_a_layer_above_its_own():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        here = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for module, names, line in _imports(path):
            targets = [module] if module else [f"embedcache.{n}" for n in names if n != "__version__"]
            for target in targets:
                part = _part(target)
                if part != "__init__" and LAYERS[part] > LAYERS[here]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_part_of_the_package_has_a_layer():
    parts = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.name != "__pycache__" and p.name != "__init__.py"}
    assert parts == set(LAYERS)


def _module_graph() -> dict[str, set[str]]:
    """Each module of the package → the package's modules it imports, anywhere in it (inside functions and under
    TYPE_CHECKING too: a cycle there is a cycle of the design)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embedcache"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("embedcache")}
        graph[module] = {m for m in found if m in modules and m != module}
    return graph


def test_no_two_modules_import_each_other_round_a_cycle():
    graph = _module_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue  # a package and its own modules
            if state.get(target) == 1:
                cycles.append(" → ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
