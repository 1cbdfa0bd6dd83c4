"""Reshapes (view/reshape/flatten/unflatten/squeeze/unsqueeze), permutes, expands and size queries.

A reshape is cut into blocks of dims with equal products. A block that splits one dim into several (or merges
several into one) can carry channels through only one of its factors; each factor is offered as a choice and the
analysis keeps the one least frozen by the rest of the graph (e.g. the group-inner factor of a channel shuffle,
the channel factor of a flatten). Constant sizes are rewritten after shrinking; sizes computed in the graph
follow by themselves.
"""
from __future__ import annotations

import builtins
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..ir.context import RewriteContext
from ..ir.coupling import Coupling, Tie, make_tie
from ..ir.space import Port, arange
from ..ir.spec import spec_of
from .registry import OpRule, arg, register_op


def reshape_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair dims of ``a`` and ``b`` (size-1 dims left out) into blocks with equal products."""
    ia = [d for d, n in enumerate(a) if n != 1]
    ib = [d for d, n in enumerate(b) if n != 1]
    i = j = 0
    out = []
    while i < len(ia) and j < len(ib):
        da, db = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                da.append(ia[i]); pa *= a[ia[i]]; i += 1  # noqa: E702
            elif pb < pa and j < len(ib):
                db.append(ib[j]); pb *= b[ib[j]]; j += 1  # noqa: E702
            else:
                return out
        out.append((da, db))
    return out


#: ``hint(node, splits, dim, options) -> bool``: prefer factor ``dim`` of a split (on the node's output, ``splits``)
#: or of a merge (on its input), under the analysis ``options``. A hint that singles out one factor turns the choice
#: into firm ties (e.g. attention heads).
FactorHint = Callable[[fx.Node, bool, int, Mapping[str, Any]], bool]
_FACTOR_HINTS: list[FactorHint] = []


def register_factor_hint(fn: FactorHint) -> FactorHint:
    """Register a hint naming the reshape factor that must carry channels (see ``ops/attention.py``)."""
    _FACTOR_HINTS.append(fn)
    return fn


def _choose_factor(c: Coupling, options: list[list[Tie]], dims: list[int], splits: bool) -> None:
    hinted = [i for i, d in enumerate(dims) if any(h(c.node, splits, d, c.options) for h in _FACTOR_HINTS)]
    if len(hinted) == 1:
        c.ties.extend(options[hinted[0]])
    else:
        c.choose(options)


def _factor_options(one: Port, d: int, many: Port, dims: list[int]) -> list[list[Tie]]:
    """Ties of ``one``'s dim ``d`` to each factor dim of ``many`` (row-major), one option per factor.

    The factor side is always the tie's ``b`` side: the analysis ranks options by it.
    """
    sizes = [many.shape[k] for k in dims]
    n = math.prod(sizes)
    options = []
    for t, k in enumerate(dims):
        coord = (arange(n) // math.prod(sizes[t + 1:])) % sizes[t]
        options.append([make_tie(one.space(d), arange(n), many.space(k), coord)])
    return options


def couple_reshape(x: Port, y: Port, c: Coupling) -> None:
    for din, dout in reshape_blocks(x.shape, y.shape):
        if len(din) == 1 and len(dout) == 1:
            c.tie(x.space(din[0]), y.space(dout[0]), size=x.shape[din[0]])
        elif len(din) == 1:
            _choose_factor(c, _factor_options(x, din[0], y, dout), dout, True)
        elif len(dout) == 1:
            _choose_factor(c, _factor_options(y, dout[0], x, din), din, False)


def _sizes_args(node: fx.Node) -> tuple[int, list]:
    """Where the size list starts in ``node.args`` and the list itself."""
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return 1, list(node.args[1])
    return 1, list(node.args[1:])


def _rewrite_sizes(sizes: list, new_shape: tuple[int, ...], old_shape: tuple[int, ...] | None = None) -> list:
    """Constant sizes become the new ones; a size computed in the graph (a node) is replaced only where that dim
    shrank, since its source need not shrink with it (``reshape(B, N, C)`` with ``C`` read off the input, after
    attention heads were removed)."""
    old_shape = old_shape or new_shape
    return [new_shape[d]
            if (isinstance(s, int) and s != -1) or (isinstance(s, fx.Node) and new_shape[d] != old_shape[d]) else s
            for d, s in enumerate(sizes)]


@register_op(torch.flatten, torch.squeeze, torch.unsqueeze, torch.reshape, torch.unflatten, nn.Flatten,
             "view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as")
class ReshapeRule(OpRule):
    name = "reshape"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is not None and y is not None:
            couple_reshape(x, y, c)

    def scope(self, node: fx.Node, c: Coupling) -> list[Port]:
        return [p for p in (c.port(node.args[0]), c.out()) if p is not None]

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        new_shape, old_shape = r.shape(node), spec_of(node).shape
        if node.target in ("view", "reshape") or node.target is torch.reshape:
            if node.target is torch.reshape:
                node.args = (node.args[0], tuple(_rewrite_sizes(list(arg(node, 1, "shape")), new_shape, old_shape)))
                return
            _, sizes = _sizes_args(node)
            node.args = (node.args[0], *_rewrite_sizes(sizes, new_shape, old_shape))
        elif node.target in ("unflatten", torch.unflatten):
            dim = arg(node, 1, "dim") % len(r.shape(node.args[0]))
            sizes = list(arg(node, 2, "sizes"))
            new = _rewrite_sizes(sizes, new_shape[dim:dim + len(sizes)])
            node.args = (node.args[0], arg(node, 1, "dim"), tuple(new))
            node.kwargs = {}


@register_op(torch.permute, torch.transpose, torch.swapaxes, torch.t, "permute", "transpose", "swapaxes", "t")
class PermuteRule(OpRule):
    """Dims are reordered: output dim i is input dim ``perm[i]``."""

    name = "permute"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None:
            return
        n = x.ndim
        if node.target in ("permute", torch.permute):
            _, dims = _sizes_args(node)
            perm = [int(d) % n for d in dims]
        else:
            if node.target in ("t", torch.t):
                d0, d1 = 0, n - 1
            else:
                d0, d1 = int(node.args[1]) % n, int(node.args[2]) % n
            perm = list(range(n))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        for i, p in enumerate(perm):
            c.tie_dims(x, p, y, i)


@register_op("expand", "expand_as")
class ExpandRule(OpRule):
    """Broadcast to a larger shape: dims kept at their size are tied; constant sizes are rewritten."""

    name = "expand"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is not None and y is not None:
            c.tie_broadcast(x, y)

    def scope(self, node: fx.Node, c: Coupling) -> list[Port]:
        return [p for p in (c.port(node.args[0]), c.out()) if p is not None]

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        if node.target == "expand":
            _, sizes = _sizes_args(node)
            node.args = (node.args[0], *_rewrite_sizes(sizes, r.shape(node)))


@register_op("size", "dim", builtins.getattr)
class SizeQueryRule(OpRule):
    """``x.size()``, ``x.shape``, ``x.dim()``: values computed in the graph follow the shrunk tensor."""

    name = "size"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x = c.port(node.args[0])
        if x is None:
            return
        if node.target is builtins.getattr and node.args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
            return
        for d in range(x.ndim):
            c.free(x.space(d))

