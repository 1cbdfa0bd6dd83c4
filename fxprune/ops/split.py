"""Splitting and indexing: split/chunk/tensor_split/unbind, ``getitem`` of tuples and tensor slicing."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from ..ir.context import RewriteContext
from ..ir.coupling import Coupling
from ..ir.space import Port, Space, arange
from ..ir.spec import TensorSpec, spec_of
from .registry import OpRule, arg, register_op

_INT_DTYPES = (torch.int64, torch.int32)


def _items(node: fx.Node, c: Coupling) -> list[Port]:
    spec = spec_of(node)
    return [c.port(node, i) for i in range(len(spec))] if isinstance(spec, tuple) else []


def _equal_items(node: fx.Node, items: list[Port], dim: int) -> bool:
    """Whether ``node`` cuts equal items by a count or an int size (``chunk(2)``, ``split(c)``), not by a list."""
    sizes = arg(node, 1, "split_size_or_sections", arg(node, 1, "chunks", arg(node, 1, "split_size")))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name == "split_with_sizes" or name != "chunk" and not isinstance(sizes, int):
        return False
    return len({y.shape[dim] for y in items}) == 1


@register_op(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split", "split_with_sizes")
class SplitRule(OpRule):
    """Each output item takes a consecutive range of the input along the split dim.

    The rewrite turns every variant into ``torch.split(x, sizes, dim)`` with the shrunk sizes, since pruned chunks
    need not stay equal. Under the analysis option ``{"chunks": "even"}`` (``output="module"``: the user's forward
    still calls ``chunk(n)``), the equal items of a ``chunk`` or of an int-sized ``split`` are paired slot by slot,
    so they lose the same channels and stay equal.
    """

    name = "split"

    def _dim(self, node: fx.Node) -> int:
        return arg(node, 2, "dim", 0)

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x = c.port(node.args[0])
        items = _items(node, c)
        if x is None or not items or any(p is None for p in items):
            return
        dim = self._dim(node) % x.ndim
        offset = 0
        for y in items:
            n = y.shape[dim]
            for d in range(x.ndim):
                if d != dim:
                    c.tie_dims(x, d, y, d)
            c.tie(x.space(dim), y.space(dim), offset + arange(n), arange(n))
            offset += n
        if c.options.get("chunks") == "even" and _equal_items(node, items, dim):
            for y in items[1:]:
                c.tie(items[0].space(dim), y.space(dim), size=items[0].shape[dim])

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        items = len(spec_of(node))
        x = node.args[0]
        dim = self._dim(node) % len(r.shape(x))
        sizes = [r.shape(node, i)[dim] for i in range(items)]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (x, sizes, dim), {}


@register_op(torch.unbind, "unbind")
class UnbindRule(OpRule):
    """Each item drops the unbound dim (frozen); other dims are tied."""

    name = "unbind"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x = c.port(node.args[0])
        if x is None:
            return
        dim = arg(node, 1, "dim", 0) % x.ndim
        for y in _items(node, c):
            for d in range(x.ndim):
                if d != dim:
                    c.tie_dims(x, d, y, d if d < dim else d - 1)


def _normalize_index(index: object, ndim: int) -> list[object] | None:
    """Expand an index into one entry per input dim (``None`` entries add output dims); None if unsupported."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in items):
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: list[object] = []
    for i in items:
        out.extend([slice(None)] * (ndim - consumed) if i is Ellipsis else [i])
    if Ellipsis not in items:
        out.extend([slice(None)] * (ndim - consumed))
    return out


def _simple_slice(s: slice) -> bool:
    return all(v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)) and s.step in (None, 1)


@register_op(operator.getitem)
class GetItemRule(OpRule):
    """``tuple[i]`` is an identity; ``tensor[...]`` with ints and unit-step slices maps kept ranges."""

    name = "getitem"

    def scope(self, node: fx.Node, c: Coupling) -> list[Port]:
        src = node.args[0]
        if isinstance(spec_of(src), tuple):
            p = c.port(src, node.args[1]) if isinstance(node.args[1], int) else None
            return [q for q in (p, c.out()) if q is not None]
        return super().scope(node, c)

    def couple(self, node: fx.Node, c: Coupling) -> None:
        src, index = node.args
        y = c.out()
        if y is None:
            return
        if isinstance(spec_of(src), tuple):
            x = c.port(src, index) if isinstance(index, int) else None
            if x is not None:
                for d in range(x.ndim):
                    c.tie_dims(x, d, y, d)
            return
        x = c.port(src)
        if x is not None and isinstance(spec_of(index), TensorSpec) and spec_of(index).dtype in _INT_DTYPES:
            # ``table[idx]`` (relative position bias tables): rows are gathered, the other dims pass through
            k = len(spec_of(index).shape)
            for d in range(1, x.ndim):
                c.tie_dims(x, d, y, d - 1 + k)
            return
        entries = _normalize_index(index, x.ndim) if x is not None else None
        if entries is None:
            return
        d_in = d_out = 0
        for e in entries:
            if e is None:
                d_out += 1
                continue
            n = x.shape[d_in]
            if isinstance(e, int):
                picked = np.array([e % n])
                c.free(x.space(d_in), np.setdiff1d(arange(n), picked))
                c.freeze(x.space(d_in), f"indexed by a constant at {node.format_node()}", picked)
            elif _simple_slice(e):
                rng = arange(n)[e]
                c.tie(x.space(d_in), y.space(d_out), rng, arange(len(rng)))
                c.free(x.space(d_in), np.setdiff1d(arange(n), rng))
                d_out += 1
            else:  # a strided or tensor-valued slice: no kept-range rewrite exists, so both sides stay whole
                reason = f"sliced with a step at {node.format_node()}"
                c.freeze(x.space(d_in), reason)
                c.freeze(y.space(d_out), reason)
                d_out += 1
            d_in += 1

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        src, index = node.args
        if isinstance(spec_of(src), tuple) or isinstance(index, fx.Node):
            return
        entries = _normalize_index(index, len(spec_of(src).shape))
        new: list[object] = []
        d_in = 0
        for e in entries:
            if e is None:
                new.append(e)
                continue
            kept = r.kept(Space(src.name, 0, d_in))
            if kept is not None and isinstance(e, int):
                e = int(np.searchsorted(kept, e % spec_of(src).shape[d_in]))
            elif kept is not None and isinstance(e, slice):
                n = spec_of(src).shape[d_in]
                start, stop, _ = e.indices(n)
                e = slice(int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop)))
            new.append(e)
            d_in += 1
        node.args = (src, tuple(new))
