"""The package's shape (ARCHITECTURE.md): module-level imports form no cycle, every layer imports only layers below
it, and every stage kind lives under ``fxprune.stages``.

Imports are read statically (``ast``) from the source files, so a cycle is found even where Python's import order
happens to hide it. Function-local imports are not module-level imports and are not counted.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import networkx as nx

import fxprune
from fxprune.stages import Stage, stage_class, stage_kinds

ROOT = Path(fxprune.__file__).resolve().parent
KERNELS = ROOT.parent / "kernels"  # installed as fxprune.kernels

#: the layer of every top-level part of fxprune (ARCHITECTURE.md, "What each layer may import"): a module may import
#: its own part and parts of a lower rank only. "" is the package itself (``fxprune/__init__.py``, the public facade).
RANKS = {
    "ir": 0, "errors": 0, "outputs": 0, "copies": 0, "defaults": 0, "attribute_snapshot": 0, "modes": 0,
    "distributed": 0,
    "kernels": 1, "progress": 1, "nn": 2,
    "ops": 3,
    "analysis": 4, "trace": 4, "plan": 4, "inputs": 4,
    "work": 5, "criteria": 5, "passes": 5, "capture": 5, "latency": 5,
    "planner": 6, "recover": 6,
    "stages": 7,
    "recipe": 8,
    "submodule": 9,
    "api": 10, "report": 10, "serialize": 10,
    "testing": 11,
    "": 12,
    "cli": 13, "demo": 13, "examples": 13,
    "__main__": 14,
}


def _source_files() -> dict[str, Path]:
    """Module name -> source file, for every module of fxprune (kernels from their real folder)."""
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "kernels":  # a development symlink to ../kernels
            continue
        parts = ["fxprune", *rel.with_suffix("").parts]
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted(KERNELS.glob("*.py")):
        files["fxprune.kernels" if path.stem == "__init__" else f"fxprune.kernels.{path.stem}"] = path
    return files


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements outside any function or class (inside module-level ``if``/``try`` blocks too)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return found


def import_graph() -> nx.DiGraph:
    """fxprune module -> fxprune modules it imports at module level."""
    files = _source_files()
    graph = nx.DiGraph()
    for name, path in files.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target not in files and "." in target:
                    target = target.rpartition(".")[0]
                if target in files and target != name:
                    graph.add_edge(name, target)
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_scan_sees_the_package() -> None:
    graph = import_graph()
    assert {"fxprune.api", "fxprune.stages.base", "fxprune.ir.space", "fxprune.kernels.gathered_attention"} \
        <= set(graph)
    assert graph.has_edge("fxprune.api", "fxprune.stages")
    assert graph.has_edge("fxprune.analysis", "fxprune.ops.registry")
    assert graph.has_edge("fxprune.stages.blocksparse.stage", "fxprune.stages.base")  # relative imports resolved


def test_module_level_imports_have_no_cycle() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles among fxprune modules: {cycles}"


def test_each_layer_imports_only_layers_below() -> None:
    graph = import_graph()
    unknown = sorted({_part(m) for m in graph} - set(RANKS))
    assert not unknown, f"fxprune parts {unknown} have no layer: add them to RANKS here and to ARCHITECTURE.md"
    upward = [(a, b) for a, b in graph.edges if _part(a) != _part(b) and RANKS[_part(b)] >= RANKS[_part(a)]]
    assert not upward, f"imports that do not go down a layer: {upward}"


def test_the_core_layer_imports_nothing_else_from_fxprune() -> None:
    graph = import_graph()
    outside = [(a, b) for a, b in graph.edges if _part(a) == "ir" and _part(b) != "ir"]
    assert not outside and any(_part(m) == "ir" for m in graph)


def test_every_stage_kind_lives_under_fxprune_stages() -> None:
    kinds = stage_kinds()
    assert {"channels", "iterative", "heads", "head_dim", "blocksparse", "patches"} <= set(kinds)
    for kind in kinds:
        cls = stage_class(kind, "kind")
        assert issubclass(cls, Stage) and cls.kind == kind
        assert cls.__module__.startswith("fxprune.stages."), f"stage '{kind}' is defined in {cls.__module__}"


def test_no_stage_is_defined_outside_fxprune_stages() -> None:
    outside = []
    for info in pkgutil.walk_packages(fxprune.__path__, "fxprune."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        module = importlib.import_module(info.name)
        outside += [f"{info.name}.{name}" for name, obj in vars(module).items()
                    if inspect.isclass(obj) and issubclass(obj, Stage) and obj.__module__ == info.name
                    and not info.name.startswith("fxprune.stages")]
    assert not outside, f"stage classes outside fxprune.stages: {outside}"
    assert not [p.name for p in ROOT.glob("*.py") if p.stem in ("heads", "head_dim", "iterative", "partial")]
    assert not [p.name for p in ROOT.iterdir() if p.is_dir() and p.name in ("blocksparse", "patches", "graph")]
