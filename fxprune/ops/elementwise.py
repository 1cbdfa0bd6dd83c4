"""Pass-through op families: elementwise math (with broadcasting), activations, dropout, pooling, resizing,
reductions and softmax. Each family is a table of targets plus one small rule.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir.coupling import Coupling
from .registry import OpRule, arg, register_op

# Elementwise on every tensor argument (broadcasting): activations, arithmetic, casts, dropout, identity.
ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.sqrt, torch.rsqrt,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.where, torch.maximum, torch.minimum, torch.pow,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu,
    F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    "add", "sub", "mul", "div", "neg", "abs", "exp", "sqrt", "rsqrt", "relu", "relu_", "sigmoid", "tanh",
    "clamp", "clamp_min", "clamp_max", "pow", "add_", "mul_", "sigmoid_", "hardswish", "contiguous", "clone",
    "float", "half", "bfloat16", "detach", "__add__", "__mul__", "__radd__", "__rmul__",
)

# Ops that keep the leading (batch, channel) dims and change the trailing spatial ones.
SPATIAL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    nn.PixelShuffle, nn.PixelUnshuffle,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.interpolate, F.pad, torch.nn.functional.upsample,
)
_SPATIAL_DIMS = {nn.PixelShuffle: 2, nn.PixelUnshuffle: 2}


@register_op(*ELEMENTWISE)
class ElementwiseRule(OpRule):
    """Every tensor argument broadcasts onto the output; equal dims are tied slot for slot."""

    name = "elementwise"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        y = c.out()
        if y is None:
            return
        for x in c.ports(list(node.args) + list(node.kwargs.values())):
            c.tie_broadcast(x, y)


@register_op("to", "type", "type_as")
class CastRule(OpRule):
    """``x.to(...)``, ``x.type(...)``, ``x.type_as(other)``: the output is ``x`` in another dtype or device; any other
    tensor argument only lends its dtype, whatever its shape."""

    name = "cast"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is not None and y is not None:
            c.tie_broadcast(x, y)


@register_op(*SPATIAL)
class SpatialRule(OpRule):
    """Pooling, resizing and padding: the non-spatial leading dims pass through."""

    name = "spatial"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None or x.ndim != y.ndim:
            return
        spatial = max(x.ndim - 2, 1)
        if node.op == "call_module":
            m = c.module()
            if isinstance(m, (nn.PixelShuffle, nn.PixelUnshuffle)):
                c.tie_dims(x, 0, y, 0)  # channels are rearranged with space: only the batch passes
                return
            name = type(m).__name__
            spatial = int(name[-2]) if name[-2].isdigit() else spatial
        elif node.target is F.pad:
            spatial = len(arg(node, 1, "pad")) // 2
        for d in range(x.ndim - spatial):
            c.tie_dims(x, d, y, d)


def _dims(value: object, ndim: int) -> list[int] | None:
    if value is None:
        return None
    dims = list(value) if isinstance(value, (list, tuple)) else [value]
    return [int(d) % ndim for d in dims]


@register_op(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin", "std", "var")
class ReductionRule(OpRule):
    """Reductions over some dims: the reduced dims are frozen, the rest pass through."""

    name = "reduction"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None:
            return
        dims = _dims(arg(node, 1, "dim"), x.ndim)
        if dims is None:
            return
        keep = bool(arg(node, 2, "keepdim", False))
        j = 0
        for d in range(x.ndim):
            if d in dims:
                j += keep
                continue
            c.tie_dims(x, d, y, j)
            j += 1


@register_op(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax", nn.Softmax,
             nn.LogSoftmax)
class SoftmaxRule(OpRule):
    """Softmax normalizes along one dim (frozen); others pass through."""

    name = "softmax"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None:
            return
        dim = c.module().dim if node.op == "call_module" else arg(node, 1, "dim")
        if dim is None:
            return
        for d in range(x.ndim):
            if d != dim % x.ndim:
                c.tie_dims(x, d, y, d)


def register_torchvision() -> None:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional
        return
    from .registry import register_functions

    register_functions(ElementwiseRule, [stochastic_depth])
