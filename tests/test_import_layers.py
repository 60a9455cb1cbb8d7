"""Imports run one way: tools -> engine -> model parts (and data) -> leaf layers.

Every ``import`` / ``from ... import`` statement of every qsegformers module (function-level ones included)
and of every script under ``tools/`` is parsed with ``ast``; an import of a module from a higher layer is
a violation, and the packages of the model-parts layer must not import each other in a cycle.
"""
import ast
import glob
import os
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "qsegformers"

# Layer of each qsegformers module, by the longest matching dotted prefix (relative to ``qsegformers``).
# A module may import only modules of its own layer or of lower layers.
LEAF, MODEL, ENGINE, TOOLS = 0, 1, 2, 3
LAYER_NAMES = {LEAF: "leaf", MODEL: "model parts", ENGINE: "engine", TOOLS: "tools"}
LAYERS: Dict[str, int] = {
    "": MODEL,  # qsegformers/__init__.py imports the model packages for their registrations
    # leaf: no dependency on any other layer
    "_C": LEAF,  # the compiled ops (setup.py)
    "d2_compat": LEAF,
    "registries": LEAF,
    "ops": LEAF,
    "layers": LEAF,
    "utils": LEAF,
    # model parts, their configuration and the data they consume
    "config": MODEL,
    "meta_arch": MODEL,
    "head": MODEL,
    "inference": MODEL,
    "sliding_window": MODEL,
    "backbones": MODEL,
    "pixel_decoders": MODEL,
    "decoders": MODEL,
    "losses": MODEL,
    "matching": MODEL,
    "data": MODEL,
    "evaluation": MODEL,
    # training / evaluation driver
    "engine": ENGINE,
    # shared set-up of the scripts in tools/ (they build models, trainers and checkpointers)
    "utils.tool_setup": TOOLS,
    "utils.demo_predictor": TOOLS,
    "utils.benchmark": TOOLS,
    "utils.export": TOOLS,
}
# Known violations still to be removed, as (importing module, imported module). The test fails when one
# is added AND when one of these is fixed (then delete it here).
KNOWN_VIOLATIONS: Set[Tuple[str, str]] = {
    # data derives NUM_CLASSES with the engine's class-list rule (engine.validation.dataset_classes)
    ("qsegformers.data.datasets.custom", "qsegformers.engine.validation"),
}
# Known package cycles still to be removed, as (package, package it imports that reaches it back); same rule.
KNOWN_CYCLES: Set[Tuple[str, str]] = {
    # head.MaskFormerHead builds decoders; decoders.faseg_head subclasses MaskFormerHead
    ("decoders", "head"),
    ("head", "decoders"),
}


def _package_modules() -> Iterator[Tuple[str, str, bool]]:
    """(dotted module name, file path, is a package __init__) of every qsegformers module."""
    base = os.path.join(ROOT, PACKAGE)
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and d != "csrc")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), ROOT)[: -len(".py")].split(os.sep)
            is_init = rel[-1] == "__init__"
            yield ".".join(rel[:-1] if is_init else rel), os.path.join(folder, name), is_init


def _tool_scripts() -> Iterator[Tuple[str, str, bool]]:
    for name in sorted(os.listdir(os.path.join(ROOT, "tools"))):
        if name.endswith(".py"):
            yield f"tools.{name[:-3]}", os.path.join(ROOT, "tools", name), False


def _imports(module: str, path: str, is_init: bool) -> List[str]:
    """Absolute names of the qsegformers modules (or names inside them) that ``path`` imports."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module.split(".") if is_init else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module
            # ``from pkg import name``: name may be a submodule; classify it by its own path when it is one.
            found.extend(f"{source}.{alias.name}" for alias in node.names)
    return [name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def _existing_module(name: str) -> str:
    """The longest prefix of ``name`` that is a qsegformers module or package."""
    parts = name.split(".")
    while parts:
        path = os.path.join(ROOT, *parts)
        if os.path.isdir(path) or os.path.isfile(path + ".py") or glob.glob(path + ".*.so"):
            return ".".join(parts)
        parts.pop()
    raise AssertionError(f"{name} is not a module")


def _layer(module: str) -> int:
    if module.startswith("tools."):
        return TOOLS
    rel = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    keys = [key for key in LAYERS if key == "" or rel == key or rel.startswith(key + ".")]
    if not keys:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_import_layers.py")
    return LAYERS[max(keys, key=len)]


def _graph() -> Dict[str, Set[str]]:
    graph = {}
    for module, path, is_init in list(_package_modules()) + list(_tool_scripts()):
        graph[module] = {_existing_module(name) for name in _imports(module, path, is_init)} - {module}
    return graph


@pytest.fixture(scope="module")
def graph():
    return _graph()


def _violations(graph) -> Set[Tuple[str, str]]:
    return {(module, target) for module, targets in graph.items() for target in targets
            if _layer(target) > _layer(module)}


def test_every_module_has_a_layer(graph):
    for module in graph:
        _layer(module)


def test_imports_go_down_the_layers(graph):
    found = _violations(graph)
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports from a higher layer:\n" + "\n".join(
        f"  {a} ({LAYER_NAMES[_layer(a)]}) imports {b} ({LAYER_NAMES[_layer(b)]})" for a, b in new)
    fixed = sorted(KNOWN_VIOLATIONS - found)
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS: {fixed}"


def _top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_model_packages_do_not_import_each_other_in_a_cycle(graph):
    """E.g. losses -> matching -> losses: the matcher's point sampling and costs live in qsegformers.layers."""
    edges: Dict[str, Set[str]] = {}
    for module, targets in graph.items():
        if module.startswith("tools.") or _layer(module) != MODEL or module == PACKAGE:
            continue
        for target in targets:
            a, b = _top_package(module), _top_package(target)
            if a != b and b and _layer(target) == MODEL:
                edges.setdefault(a, set()).add(b)

    def reaches(start, goal, seen):
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = {(a, b) for a in edges for b in edges[a] if reaches(b, a, {b})}
    assert not cycles - KNOWN_CYCLES, f"package import cycles (a imports b, b reaches a): {sorted(cycles - KNOWN_CYCLES)}"
    assert not KNOWN_CYCLES - cycles, f"fixed, remove from KNOWN_CYCLES: {sorted(KNOWN_CYCLES - cycles)}"


def test_tools_do_not_patch_sys_path():
    """Tools import the installed package; the shared set-up (utils.tool_setup) replaces per-script hacks."""
    offenders = []
    for module, path, _ in _tool_scripts():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{module}:{node.lineno}")
    assert not offenders, f"sys.path used in {offenders}"
