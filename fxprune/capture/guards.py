"""Guards: the example-run facts a concrete trace depends on, checked again on every call.

When traced code turns a traced value into a Python value (``if x.shape[1] != c``, ``len(x)``, ``int(h)``,
``for i in range(x.size(0))``), the tracer answers from the example run and records a *decision*. Each
decision reads some input metadata:

* directly (``pixel_values.shape[1]``, ``x.dim()``, ``x.dtype``): exactly that item of that input is pinned;
* through intermediate tensors (the shape of a feature map): every input's shape (or ndim, dtype) is pinned,
  since it is what determines the intermediate one.

The traced graph starts with one ``check_input`` call per pinned input: a few integer comparisons, evaluated as
constants by ``torch.compile`` and ``torch.export``. A call that breaks a pin raises ``GuardError`` naming the
input, the expected and the actual value, the decision's source line and the remedy.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..nn.guard import GuardError, check_input  # noqa: F401  (GuardError: re-exported)
from ..trace import register_autowrap_function

_SHAPE_ATTRS = {"shape": "shape"}
_NDIM_ATTRS = {"ndim"}
_DTYPE_ATTRS = {"dtype", "is_floating_point", "is_complex", "is_quantized"}
_DEVICE_ATTRS = {"device", "is_cuda", "is_cpu", "is_meta"}
_SKIP_FILES = ("/torch/", "/fxprune/", "<")


@dataclass(frozen=True)
class Read:
    """One item of input metadata a decision depends on. ``input`` is ``None`` for "every input"."""

    input: str | None
    kind: str  # "dim", "shape" (every dim), "ndim", "dtype", "device", "value"
    dim: int | None = None


@dataclass
class Decision:
    """A Python-level decision taken from the example run's metadata."""

    what: str  # e.g. "bool(ne)"
    where: str  # "file:line: source"
    reads: frozenset[Read]


def source_line() -> str:
    """``file:line: code`` of the innermost frame outside torch and fxprune (the model's code)."""
    import linecache

    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(s in name for s in _SKIP_FILES):
            line = linecache.getline(name, frame.f_lineno).strip()
            return f"{short_path(name)}:{frame.f_lineno}: {line}"
        frame = frame.f_back
    return "<unknown location>"


def short_path(filename: str) -> str:
    """A source file name from its package on (``transformers/models/vit/modeling_vit.py``)."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _tensor_source(node: Any) -> str | None | bool:
    """The placeholder name when ``node`` is a graph input, ``False`` for a parameter/constant (its metadata is
    fixed), ``None`` for an intermediate value."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return node.target
    if node.op == "get_attr":
        return False
    return None


def _meta_read(node: fx.Node) -> tuple[Any, str, Any] | None:
    """``(tensor node, kind, dim)`` when ``node`` reads metadata of a tensor, else ``None``."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        obj, attr = node.args
        if attr == "shape":
            return obj, "shape", None
        if attr in _NDIM_ATTRS:
            return obj, "ndim", None
        if attr in _DTYPE_ATTRS:
            return obj, "dtype", None
        if attr in _DEVICE_ATTRS:
            return obj, "device", None
    if node.op == "call_method" and node.args:
        obj, name = node.args[0], node.target
        if name == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return obj, "shape" if dim is None else "dim", dim
        if name in ("dim", "ndimension"):
            return obj, "ndim", None
        if name in ("numel", "nelement"):
            return obj, "shape", None
        if name in ("is_floating_point", "is_complex", "element_size"):
            return obj, "dtype", None
        if name == "get_device":
            return obj, "device", None
    return None


def reads_of(node: fx.Node, ndims: dict[str, int]) -> frozenset[Read]:
    """The input metadata the value of ``node`` depends on (see the module docstring)."""
    out: set[Read] = set()
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        dims = None
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            inner = _meta_read(n.args[0])
            if inner is not None and inner[1] == "shape" and isinstance(n.args[1], (int, slice)):
                dims, read = n.args[1], inner
        read = _meta_read(n) if dims is None else read
        if read is not None:
            source, kind, dim = read
            src = _tensor_source(source)
            if src is False:
                continue
            if dims is not None:
                kind, dim = "dim", dims
            if kind == "dim" and src is not None:
                ndim = ndims.get(src, 0)
                picked = range(ndim)[dim] if isinstance(dim, slice) else [dim % ndim if ndim else dim]
                out.update(Read(src, "dim", d) for d in picked)
                if isinstance(dim, slice) or (isinstance(dim, int) and dim < 0):
                    out.add(Read(src, "ndim"))
            else:
                out.add(Read(src, "shape" if kind == "dim" else kind))
            continue
        if n.op == "placeholder":
            out.add(Read(n.target, "value"))
        stack.extend(n.all_input_nodes)
    return frozenset(out)


register_autowrap_function(check_input)  # tracing a captured GraphModule again keeps its guards as nodes


@dataclass
class GuardSet:
    """Pins per input, each with the decisions that need it."""

    decisions: list[Decision] = field(default_factory=list)

    def pins(self, inputs: dict[str, Any]) -> dict[str, dict[Any, list[Decision]]]:
        """``{input: {pin: [decisions]}}`` with pins ``"ndim"``, ``("dim", d)``, ``"dtype"``, ``"value"``."""
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out: dict[str, dict[Any, list[Decision]]] = {k: {} for k in inputs}
        for d in self.decisions:
            for r in d.reads:
                names = [r.input] if r.input is not None else list(tensors)
                for name in names:
                    v = inputs.get(name)
                    if isinstance(v, torch.Tensor):
                        keys = {"shape": [("dim", i) for i in range(v.ndim)], "dim": [("dim", r.dim)],
                                "ndim": ["ndim"], "dtype": ["dtype"]}.get(r.kind, [])
                        if r.kind in ("shape", "dim"):
                            keys.append("ndim")
                    else:
                        keys = ["value"] if r.kind == "value" and isinstance(v, (int, float, bool, str)) else []
                    for key in keys:
                        out[name].setdefault(key, []).append(d)
        return {k: v for k, v in out.items() if v}

    def insert(self, graph: fx.Graph, inputs: dict[str, Any]) -> int:
        """Insert one ``check_input`` node per pinned input after the placeholders; returns the number of pins."""
        placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
        pins = self.pins(inputs)
        if not pins:
            return 0
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        count = 0
        for name, by_pin in pins.items():
            x = inputs[name]

            def why(key: Any) -> str:
                ds = by_pin.get(key, [])
                if not ds:
                    return "a decision depends on it"
                more = f" (and {len(ds) - 1} more decisions)" if len(ds) > 1 else ""
                return f"the traced code decided '{ds[0].what}' from it at {ds[0].where}{more}"

            dims = tuple(sorted((k[1], int(x.shape[k[1]])) for k in by_pin if isinstance(k, tuple)))
            args = (placeholders[name], name,
                    x.ndim if "ndim" in by_pin and isinstance(x, torch.Tensor) else None, dims,
                    x.dtype if "dtype" in by_pin else None, x if "value" in by_pin else None,
                    (why("ndim"), *[why(("dim", d)) for d, _ in dims], why("dtype"), why("value")))
            with graph.inserting_after(last):
                last = graph.call_function(check_input, args)
            count += len(by_pin)
        return count


def guard_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The ``check_input`` nodes of a graph."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is check_input]
