"""What the stages changed in a traced graph, and whether the model's own ``forward`` can pick it up.

``output="module"`` (``passes/write_back.py``) returns the user's class, so its Python ``forward`` runs instead of
the rewritten graph. ``snapshot`` records the graph as traced (before any stage); ``explain`` compares it node by
node with the pruned graph and accepts a changed node only when the forward computes the new value by itself:

* an ``int`` constant ``old -> new`` that the forward reads from a module attribute: an ``int`` attribute equal to
  ``old`` of the module owning the node (``node.meta["nn_module_stack"]``, innermost first, then the root) whose
  class source reads ``self.<name>``. Those attributes are returned, to be set to ``new``;
* a size the graph computed (``x.shape[-1]``) replaced by a constant: accepted when that size, read off the shrunk
  tensor, equals the constant (the forward reads the same tensor);
* ``chunk(n)`` / ``split(k)`` rewritten to ``split(sizes)``: accepted when ``chunk(n)`` / ``split(k')`` of the shrunk
  dim gives those sizes (``k -> k'`` as an attribute above). Module mode plans chunks even (``{"chunks": "even"}``).

Anything else (a literal ``view(B, 768, -1)``, an argument a rewrite added, an inserted node no module-mode
translation claims) raises ``ModuleModeError`` naming the node, its source line and the constant. Whatever is
accepted is verified afterwards by running the module (``WriteBack.ensures``), so a wrong guess cannot pass.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ModuleModeError
from ..ir.spec import spec_of

_SPLITS = ("chunk", "split", "tensor_split", "split_with_sizes")


class Ref:
    """A node named in a snapshot (nodes themselves change in place)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("fxprune-ref", self.name))

    def __repr__(self) -> str:
        return f"%{self.name}"


def form(node: fx.Node, alias: Mapping[str, str] | None = None) -> tuple:
    """``(op, target, args, kwargs)`` of ``node`` with nodes as ``Ref``s (``alias`` renames inserted nodes)."""
    alias = alias or {}
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: Ref(alias.get(n.name, n.name)))
    return node.op, node.target, args, kwargs


@dataclass
class Traced:
    """The graph as traced, before any stage: node forms, and weak references to its tensors and modules."""

    nodes: dict[str, tuple]
    tensors: dict[str, weakref.ref]
    modules: dict[str, weakref.ref]
    shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)  # recorded tensor shapes, when known

    def same_tensor(self, name: str, value: Any) -> bool:
        ref = self.tensors.get(name)
        return ref is not None and ref() is value

    def same_module(self, path: str, module: nn.Module) -> bool:
        ref = self.modules.get(path)
        return ref is not None and ref() is module


def snapshot(gm: fx.GraphModule) -> Traced:
    """Record ``gm`` as traced (weak references: replaced tensors are not kept alive)."""
    tensors = {k: weakref.ref(v) for k, v in [*gm.named_parameters(remove_duplicate=False),
                                              *gm.named_buffers(remove_duplicate=False)]}
    modules = {k: weakref.ref(m) for k, m in gm.named_modules(remove_duplicate=False)}
    shapes = {n.name: tuple(spec.shape) for n in gm.graph.nodes
              if (spec := spec_of(n)) is not None and hasattr(spec, "shape")}
    return Traced({n.name: form(n) for n in gm.graph.nodes}, tensors, modules, shapes)


def source_of(node: fx.Node) -> str:
    """``file:line: code`` of the innermost user frame that made ``node`` (``"unknown source line"`` without one)."""
    trace = node.stack_trace or ""
    found = [f for f in re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
             if "/torch/" not in f[0] and "/fxprune/" not in f[0]]
    if not found:
        return "an unknown source line"
    path, line, code = found[-1]
    return f"{'/'.join(path.split('/')[-2:])}:{line}: {code.strip()}"


def refusal(node: fx.Node | None, what: str) -> ModuleModeError:
    where = f"{node.format_node()} (at {source_of(node)}): " if node is not None else ""
    return ModuleModeError(f"output='module' cannot apply this plan to the model's own forward: {where}{what}. "
                           f"output='graph' (the default) works: it rewrites the graph itself")


def _sources(cls: type) -> list[str]:
    out = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        try:
            out.append(inspect.getsource(klass))
        except (OSError, TypeError):  # built without source (C extension, interactive session)
            continue
    return out


@functools.cache
def _split_reads(cls: type) -> frozenset[str]:
    """Attribute names ``self.<name>`` the source of ``cls`` passes to a ``split(...)`` call on one line (e.g.
    Ultralytics C2f's ``split((self.c, self.c), 1)``, an alternative forward that export switches to)."""
    names: set[str] = set()
    for src in _sources(cls):
        for line in re.findall(r"split\((.*)", src):
            names |= set(re.findall(r"\bself\.([A-Za-z_]\w*)\b(?!\()", line))
    return frozenset(names)


@functools.cache
def _reads(cls: type) -> frozenset[str]:
    """Attribute names ``self.<name>`` the source of ``cls`` (and of its bases up to ``nn.Module``) mentions."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        try:
            names |= set(re.findall(r"\bself\.([A-Za-z_]\w*)", inspect.getsource(klass)))
        except (OSError, TypeError):  # built without source (C extension, interactive session)
            continue
    return frozenset(names)


def _owners(node: fx.Node) -> list[str]:
    """Paths of the modules whose forward made ``node``, innermost first, then the root (``""``)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
    return [p for p in reversed(paths) if p] + [""]


def _pairs(old: Any, new: Any) -> list[tuple[Any, Any]] | None:
    """Leaf pairs of two argument structures, or ``None`` when their structure differs."""
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        if len(old) != len(new):
            return None
        out: list[tuple[Any, Any]] = []
        for o, n in zip(old, new):
            sub = _pairs(o, n)
            if sub is None:
                return None
            out += sub
        return out
    if isinstance(old, dict) and isinstance(new, dict):
        if old.keys() != new.keys():
            return None
        return _pairs(list(old.values()), list(new.values()))
    if isinstance(old, slice) and isinstance(new, slice):
        return _pairs([old.start, old.stop, old.step], [new.start, new.stop, new.step])
    if isinstance(old, (tuple, list, dict, slice)) or isinstance(new, (tuple, list, dict, slice)):
        return None
    return [(old, new)]


def _same(o: Any, n: Any) -> bool:
    return o is n or type(o) is type(n) and not isinstance(o, torch.Tensor) and o == n


def _equal(old: tuple, new: tuple) -> bool:
    if old[:2] != new[:2]:
        return False
    pairs = _pairs(list(old[2:]), list(new[2:]))
    return pairs is not None and all(_same(o, n) for o, n in pairs)


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


class _Explainer:
    def __init__(self, gm: fx.GraphModule, target: nn.Module, shapes: Mapping[str, tuple] | None = None) -> None:
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.shapes = shapes or {}
        self.target = target
        self.updates: dict[tuple[str, str], int] = {}

    def constant(self, node: fx.Node, old: int, new: int) -> None:
        """Find the module attributes the forward reads ``old`` from; record them to become ``new``."""
        tried = []
        for path in _owners(node):
            try:
                module = self.target.get_submodule(path)
            except AttributeError:
                continue
            reads = _reads(type(module))
            names = [k for k, v in vars(module).items() if type(v) is int and v == old and k in reads]
            tried.append(f"'{path}' ({type(module).__name__})" if path else f"the root ({type(module).__name__})")
            for k in names:
                prev = self.updates.setdefault((path, k), new)
                if prev != new:
                    raise refusal(node, f"attribute '{k}' of module '{path}' would have to become both {prev} and "
                                        f"{new}")
            if names:
                return
        raise refusal(node, f"the plan changes the constant {old} to {new}, and no int attribute equal to {old} that "
                            f"the forward reads explains it (looked in {', '.join(tried)}); a literal size in the "
                            f"forward cannot follow the pruned channels")

    def value(self, ref: Ref) -> Any:
        node = self.nodes.get(ref.name)
        return spec_of(node) if node is not None else None

    def node(self, node: fx.Node, old: tuple, new: tuple) -> None:
        if _name(old[1]) in _SPLITS and new[1] is torch.split:
            self.split(node, old, new)
            return
        if old[:2] != new[:2]:
            raise refusal(node, f"the plan changes the op from {old[0]} {_name(old[1])} to {new[0]} {_name(new[1])}")
        pairs = _pairs(list(old[2:]), list(new[2:]))
        if pairs is None:
            raise refusal(node, f"the plan changes the arguments from {old[2:]} to {new[2:]} (the forward passes "
                                "the old ones)")
        for o, n in pairs:
            if _same(o, n):
                continue
            if type(o) is int and type(n) is int:
                self.constant(node, o, n)
            elif isinstance(o, Ref) and type(n) is int and self.value(o) == n:
                continue  # a size the forward reads off a tensor that shrank with it
            else:
                raise refusal(node, f"the plan replaces {o!r} by {n!r}, which the forward cannot compute")

    def split(self, node: fx.Node, old: tuple, new: tuple) -> None:
        kind = _name(old[1])
        x, sizes, dim = new[2]
        args = list(old[2]) + [None] * 3
        kw = old[3]
        second = args[1] if args[1] is not None else next(
            (kw[k] for k in ("chunks", "split_size_or_sections", "split_size", "sections", "indices_or_sections")
             if k in kw), None)
        total = sum(sizes)
        if isinstance(second, (list, tuple)) and kind in ("split", "split_with_sizes"):
            if len(second) != len(sizes):
                raise refusal(node, f"the plan cuts {len(sizes)} items, the forward {len(second)}")
            for o, n in zip(second, sizes):
                if o != n:
                    self.constant(node, o, n)
            return
        if not isinstance(second, int):
            raise refusal(node, f"the plan cuts the dim into {sizes}, which the forward's {kind} cannot reproduce")
        cut = torch.empty(total)
        if kind == "chunk":
            got = [len(t) for t in cut.chunk(second)]
            if got == list(sizes):
                self.piece(node, old, sizes)
        elif kind == "tensor_split":
            got = [len(t) for t in cut.tensor_split(second)]
        else:  # split(k): items of k' = sizes[0] each, from the attribute k is read from
            got = [len(t) for t in cut.split(sizes[0])]
            if got == list(sizes) and sizes[0] != second:
                self.constant(node, second, sizes[0])
        if got != list(sizes):
            raise refusal(node, f"{kind}({second}) of the {total} kept channels cuts {got}, the plan needs {sizes} "
                                "(the items lose different channels)")


    def piece(self, node: fx.Node, old: tuple, sizes: Any) -> None:
        """A ``chunk`` that stays even: attributes equal to the dense piece width that the class passes to a
        ``split`` elsewhere (an alternative forward) follow the kept width, so that forward agrees too."""
        src = old[2][0] if old[2] and isinstance(old[2][0], Ref) else None
        dense = self.shapes.get(src.name) if src is not None else None
        dim = old[2][2] if len(old[2]) > 2 else old[3].get("dim", 0)
        if dense is None or len(set(sizes)) != 1 or type(dim) is not int or not -len(dense) <= dim < len(dense):
            return
        before = dense[dim]
        if before % len(sizes):
            return
        width, kept = before // len(sizes), sizes[0]
        if width == kept:
            return
        for path in _owners(node):
            try:
                module = self.target.get_submodule(path)
            except AttributeError:
                continue
            names = [k for k, v in vars(module).items() if type(v) is int and v == width
                     and k in _split_reads(type(module))]
            for k in names:
                self.updates.setdefault((path, k), kept)
            if names:
                return


def explain(gm: fx.GraphModule, traced: Traced, target: nn.Module, claimed: Iterable[str] = (),
            alias: Mapping[str, str] | None = None) -> dict[tuple[str, str], int]:
    """Check every node of the pruned ``gm`` against ``traced`` (see the module docstring); returns the module
    attributes to set, ``{(module path, name): new value}``. ``claimed`` nodes (inserted by a rewrite whose
    module-mode translation is registered) are skipped; ``alias`` names the traced node each one stands for.

    Raises:
        ModuleModeError: a change the forward cannot pick up, naming the node and its source line.
    """
    claimed = set(claimed)
    ex = _Explainer(gm, target, traced.shapes)
    now = {n.name for n in gm.graph.nodes}
    gone = [name for name in traced.nodes if name not in now]
    if gone:
        raise refusal(None, f"the plan removed node %{gone[0]} from the graph")
    for node in gm.graph.nodes:
        if node.name in claimed:
            continue
        old = traced.nodes.get(node.name)
        if old is None:
            raise refusal(node, "a rewrite inserted this node, and it has no module-mode form (no translation "
                                "registered with fxprune.passes.write_back.register_module_rewrite)")
        new = form(node, alias)
        if not _equal(old, new):
            ex.node(node, old, new)
    return ex.updates


__all__ = ["Traced", "snapshot", "explain", "form", "refusal", "source_of", "Ref"]
