"""Concatenation and stacking: ``torch.cat`` maps each input's channels to its offset in the output."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.coupling import Coupling
from ..ir.space import arange
from .registry import OpRule, arg, register_op


@register_op(torch.cat, torch.concat, torch.concatenate)
class CatRule(OpRule):
    """Inputs' slots along the cat dim map to consecutive offsets of the output; other dims are tied."""

    name = "cat"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        y = c.out()
        xs = c.ports(arg(node, 0, "tensors"))
        if y is None or not xs:
            return
        dim = arg(node, 1, "dim", 0) % y.ndim
        offset = 0
        for x in xs:
            n = x.shape[dim]
            for d in range(y.ndim):
                if d != dim:
                    c.tie_dims(x, d, y, d)
            c.tie(x.space(dim), y.space(dim), arange(n), offset + arange(n))
            offset += n


@register_op(torch.stack)
class StackRule(OpRule):
    """A new dim is inserted (frozen); every input's dims are tied to the output's."""

    name = "stack"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        y = c.out()
        xs = c.ports(arg(node, 0, "tensors"))
        if y is None or not xs:
            return
        new = arg(node, 1, "dim", 0) % y.ndim
        c.freeze(y.space(new), f"new dim of {node.format_node()}")
        for x in xs:
            for d in range(x.ndim):
                c.tie_dims(x, d, y, d if d < new else d + 1)
