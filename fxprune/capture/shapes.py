"""Spelling out shape arithmetic so the reshape rules can read it.

Hugging Face attention writes ``x.view(x.size()[:-1] + (heads, head_dim))``: the target shape is one node, an
``add`` of a size slice and a constant tuple, whose constants the reshape rules cannot see or rewrite. With the
example run's values known, such a node is spelled out element by element,
``x.view(size[0], size[1], heads, head_dim)`` (``size[i]`` a ``getitem`` of the shape), as torchvision and timm
models write it. Nothing is computed differently: each element is the same value.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

_SHAPE_METHODS = {"view", "reshape", "expand", "repeat", "new_zeros", "new_ones", "new_empty", "new_full",
                  "broadcast_to"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.broadcast_to}


def _int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


class _Expander:
    def __init__(self, graph: fx.Graph, values: dict[fx.Node, Any]) -> None:
        self.graph, self.values = graph, values
        self.items: dict[fx.Node, list | None] = {}

    def elements(self, arg: Any) -> list | None:
        """The elements of a shape-valued argument (ints and nodes), or ``None`` when not expressible."""
        if isinstance(arg, (tuple, list)):
            out: list = []
            for a in arg:
                if isinstance(a, int) or isinstance(a, fx.Node) and isinstance(self.values.get(a), int):
                    out.append(a)
                else:
                    return None
            return out
        if not isinstance(arg, fx.Node) or not _int_tuple(self.values.get(arg)):
            return None
        if arg not in self.items:
            self.items[arg] = self._expand(arg)
        return self.items[arg]

    def _expand(self, node: fx.Node) -> list | None:
        n = len(self.values[node])
        is_shape = (node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
                    or node.op == "call_method" and node.target == "size" and len(node.args) == 1)
        if is_shape:
            out = []
            with self.graph.inserting_after(node):
                for i in reversed(range(n)):
                    out.append(self.graph.call_function(operator.getitem, (node, i)))
            for i, item in enumerate(reversed(out)):
                self.values[item] = self.values[node][i]
            return list(reversed(out))
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
            inner = self.elements(node.args[0])
            return None if inner is None else inner[node.args[1]]
        if node.op == "call_function" and node.target is operator.add and len(node.args) == 2:
            a, b = self.elements(node.args[0]), self.elements(node.args[1])
            return None if a is None or b is None else a + b
        return None


def _shape_args(node: fx.Node) -> tuple[int, int] | None:
    """``(first, last)`` positions of the shape arguments of a reshape-like node."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS and len(node.args) >= 2:
        return 1, len(node.args)
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS and len(node.args) == 2:
        return 1, 2
    return None


def spell_out_shapes(graph: fx.Graph, values: dict[fx.Node, Any]) -> int:
    """Rewrite the shape arguments of reshape-like nodes element by element; returns how many were rewritten."""
    ex = _Expander(graph, values)
    count = 0
    for node in list(graph.nodes):
        span = _shape_args(node)
        if span is None:
            continue
        first, last = span
        shape = node.args[first:last]
        if len(shape) == 1 and isinstance(shape[0], (fx.Node, tuple, list)):
            elems = ex.elements(shape[0])
        else:  # x.view(*new_shape): getitems of one shape-arithmetic node
            elems = []
            for a in shape:
                src = a.args[0] if isinstance(a, fx.Node) and a.op == "call_function" and \
                    a.target is operator.getitem and isinstance(a.args[1], int) else None
                if isinstance(src, fx.Node) and src.op == "call_function" and \
                        src.target in (operator.add, operator.getitem):
                    inner = ex.elements(src)
                    elems.append(inner[a.args[1]] if inner is not None else a)
                else:
                    elems.append(a)
        if not elems or list(elems) == list(shape):  # not expressible, unchanged, or a 0-d shape (``()``)
            continue
        node.args = (*node.args[:first], *elems, *node.args[last:]) if node.op == "call_method" \
            else (node.args[0], tuple(elems))
        count += 1
    return count
