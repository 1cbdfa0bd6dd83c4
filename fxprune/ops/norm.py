"""Normalization layers.

Per-channel norms (BatchNorm, InstanceNorm, torchvision's FrozenBatchNorm2d) shrink freely. GroupNorm removes
whole groups only, so the other groups' statistics are unchanged. LayerNorm's statistics span the normalized
channels, so removing one would change the others: those dims are frozen (reported), unless the analysis runs with
``options["layer_norm"] == "renormalize"`` (see ``norm_renormalize.py``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import arange
from .norm_renormalize import (
    norm_param_count,
    renormalizing,
    rewrite_normalized_shape,
    shrink_norm_module,
    tie_normalized_params,
)
from .registry import OpRule, arg, register_functions, register_op
from .tensor_attr import index_tensor, slice_attr

_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")
_ROLES = {"weight": "scale", "bias": "shift", "running_mean": "stat", "running_var": "stat"}
LAYER_NORM_REASON = "LayerNorm statistics span these channels (removing one changes the others)"


def _identity(node: fx.Node, c: Coupling) -> tuple:
    x, y = c.port(node.args[0]), c.out()
    if x is not None and y is not None:
        for d in range(x.ndim):
            c.tie_dims(x, d, y, d)
    return x, y


class _ChannelNorm(OpRule):
    """Norms with one statistic per channel (dim 1)."""

    size_attr = "num_features"

    def channels(self, m: nn.Module) -> int:
        n = getattr(m, self.size_attr, None)
        return n if n is not None else m.running_mean.shape[0]  # FrozenBatchNorm2d keeps no count

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = _identity(node, c)
        if x is None or y is None:
            return
        c.tie(y.space(1), c.param(0, self.channels(c.module())))

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        keep = r.kept_param(path, 0)
        for name in _PER_CHANNEL:
            slice_attr(m, name, 0, keep)
        if keep is not None:
            setattr(m, self.size_attr, len(keep))

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        m = gm.get_submodule(path)
        out = []
        for name in _PER_CHANNEL:
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                out.append((_ROLES[name], t.detach()[index_tensor(idx, t.device)].reshape(-1, 1)))
        return out

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        m = gm.get_submodule(path)
        n = s.axis(path, 0)
        return sum(n for p in ("weight", "bias") if isinstance(getattr(m, p, None), nn.Parameter))


@register_op(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
             nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class BatchNormRule(_ChannelNorm):
    name = "batch_norm"


@register_op(nn.GroupNorm)
class GroupNormRule(_ChannelNorm):
    """GroupNorm: channels of one group form one unit."""

    name = "group_norm"
    size_attr = "num_channels"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        super().couple(node, c)
        m = c.module()
        per = m.num_channels // m.num_groups
        i = arange(m.num_channels)
        c.tie(c.param(0, m.num_channels), c.param(0, m.num_channels), i, (i // per) * per)

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        per = m.num_channels // m.num_groups
        super().shrink_module(gm, path, r)
        m.num_groups = m.num_channels // per


def _couple_layer_norm(node: fx.Node, c: Coupling, k: int):
    """Pass every dim through and freeze the ``k`` normalized (last) dims (not when renormalizing); returns the
    input port."""
    x, y = _identity(node, c)
    if x is None or y is None:
        return None
    if renormalizing(c):
        return x
    for d in range(x.ndim - k, x.ndim):
        c.freeze(x.space(d), LAYER_NORM_REASON)
    return x


@register_op(nn.LayerNorm, nn.RMSNorm)
class LayerNormRule(OpRule):
    """LayerNorm over the last dims: other dims pass through, normalized dims are frozen (or, renormalizing, tied
    to the weight/bias axes)."""

    name = "layer_norm"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        shape = tuple(c.module().normalized_shape)
        x = _couple_layer_norm(node, c, len(shape))
        if x is not None and renormalizing(c):
            tie_normalized_params(c, x, shape)

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        shrink_norm_module(gm, path, r)

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        return norm_param_count(gm, path, s)


@register_op(F.layer_norm, F.rms_norm)
class LayerNormFunctionRule(OpRule):
    name = "layer_norm"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x = _couple_layer_norm(node, c, len(arg(node, 1, "normalized_shape")))
        if x is None:
            return
        for name, i in (("weight", 2), ("bias", 3)):  # affine tensors align with the normalized dims
            p = c.port(arg(node, i, name))
            if p is not None:
                for d in range(p.ndim):
                    c.tie_dims(p, d, x, x.ndim - p.ndim + d)

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        rewrite_normalized_shape(node, r)


@register_op(F.batch_norm, F.instance_norm)
class BatchNormFunctionRule(OpRule):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` with tensor attributes (timm's
    ``BatchNormAct2d``): per-channel statistics and affine tensors are tied to dim 1 and shrink with it."""

    name = "batch_norm"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = _identity(node, c)
        if x is None or y is None or x.ndim < 2:
            return
        names = ("running_mean", "running_var", "weight", "bias")
        for i, name in enumerate(names, start=1):
            p = c.port(arg(node, i, name))
            if p is not None and p.ndim == 1:
                c.tie(p.space(0), x.space(1), size=p.shape[0])


def register_torchvision() -> None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # torchvision is optional
        return
    register_functions(BatchNormRule, [FrozenBatchNorm2d])
