"""``nn.Linear``: axis 0 = output features, axis 1 = input features; leading dims pass through."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from .registry import OpRule, arg, register_op
from .tensor_attr import index_tensor, slice_attr


@register_op(nn.Linear)
class LinearRule(OpRule):
    """Param axis 0 = output features, axis 1 = input features; ``weight_axes`` says which weight dims hold them
    (``nn.Linear``: ``(0, 1)``; a layer storing its weight transposed overrides it, ``features`` and
    ``set_features``)."""

    name = "linear"
    weight_axes = (0, 1)

    @staticmethod
    def features(m: nn.Module) -> tuple[int, int]:
        """Output and input features of the layer (param axes 0 and 1)."""
        return m.out_features, m.in_features

    @staticmethod
    def set_features(m: nn.Module) -> None:
        """Update the layer's size attributes after its weight was sliced."""
        m.out_features, m.in_features = m.weight.shape

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None:
            return
        out, inp = self.features(c.module())
        for d in range(x.ndim - 1):
            c.tie_dims(x, d, y, d)
        c.tie(y.space(-1), c.param(0, out))
        c.tie(x.space(-1), c.param(1, inp))

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        (out_dim, in_dim), keep_out, keep_in = self.weight_axes, r.kept_param(path, 0), r.kept_param(path, 1)
        slice_attr(m, "weight", out_dim, keep_out)
        slice_attr(m, "bias", 0, keep_out)
        slice_attr(m, "weight", in_dim, keep_in)
        self.set_features(m)

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        m = gm.get_submodule(path)
        t = index_tensor(idx, m.weight.device)
        dim = self.weight_axes[axis]
        w = m.weight.detach().index_select(dim, t).movedim(dim, 0)  # one row per unit
        if axis == 1:
            return [("weight_in", w)]
        out = [("weight", w)]
        if m.bias is not None:
            out.append(("bias", m.bias.detach()[t].reshape(-1, 1)))
        return out

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        return math.prod(s.shape(node)) * s.axis(node.target, 1)

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        m = gm.get_submodule(path)
        out, inp = s.axis(path, 0), s.axis(path, 1)
        return out * inp + (out if m.bias is not None else 0)


@register_op(F.linear)
class FunctionalLinearRule(OpRule):
    """``F.linear(x, weight, bias)`` on tensors of the graph (e.g. BEiT's ``qkv`` with a concatenated bias): the
    output features follow the weight's rows and the bias, the input features its columns."""

    name = "linear"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        w, b = c.port(arg(node, 1, "weight")), c.port(arg(node, 2, "bias"))
        if x is None or y is None or w is None or w.ndim != 2:
            return
        for d in range(x.ndim - 1):
            c.tie_dims(x, d, y, d)
        c.tie_dims(w, 0, y, y.ndim - 1)
        c.tie_dims(w, 1, x, x.ndim - 1)
        if b is not None:
            c.tie_dims(b, 0, y, y.ndim - 1)

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        return math.prod(s.shape(node)) * s.shape(node.args[0])[-1]
