"""Convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d, grouped and depthwise included.

Parameter axes: 0 = output channels, 1 = input channels. With ``groups > 1`` the input and output channels of one
group are tied into one unit, so only whole groups are removed and ``groups`` shrinks with them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import arange
from .registry import OpRule, register_op
from .tensor_attr import index_tensor, slice_attr


class _ConvBase(OpRule):
    transposed = False

    def couple(self, node: fx.Node, c: Coupling) -> None:
        m = c.module()
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None:
            return
        cd = x.ndim - (m.weight.dim() - 2) - 1  # channel dim: 1 when batched, 0 when not
        if cd > 0:
            c.tie_dims(x, 0, y, 0)
        p_out, p_in = c.param(0, m.out_channels), c.param(1, m.in_channels)
        c.tie(y.space(cd), p_out)
        c.tie(x.space(cd), p_in)
        if m.groups > 1:  # one unit per group: its input and output channels go together
            cin_g, cout_g = m.in_channels // m.groups, m.out_channels // m.groups
            i, o = arange(m.in_channels), arange(m.out_channels)
            c.tie(p_in, p_out, i, (i // cin_g) * cout_g)
            c.tie(p_out, p_out, o, (o // cout_g) * cout_g)

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        keep_out, keep_in = r.kept_param(path, 0), r.kept_param(path, 1)
        out_axis, in_axis = (1, 0) if self.transposed else (0, 1)
        slice_attr(m, "bias", 0, keep_out)
        if m.groups == 1:
            slice_attr(m, "weight", out_axis, keep_out)
            slice_attr(m, "weight", in_axis, keep_in)
        else:  # whole groups: the weight's first axis lists them; its second (per-group) axis is unchanged
            slice_attr(m, "weight", 0, keep_in if self.transposed else keep_out)
            cin_g = m.in_channels // m.groups
            new_in = len(keep_in) if keep_in is not None else m.in_channels
            m.groups = new_in // cin_g
        if keep_out is not None:
            m.out_channels = len(keep_out)
        if keep_in is not None:
            m.in_channels = len(keep_in)

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        m = gm.get_submodule(path)
        w = m.weight.detach()
        n, g = len(idx), m.groups
        t = index_tensor(idx, w.device)
        produces = (axis == 0) != self.transposed  # does this axis index the weight's first dim?
        out: list[tuple[str, torch.Tensor]] = []
        if axis == 0 and m.bias is not None:
            out.append(("bias", m.bias.detach()[t].reshape(n, 1)))
        if g == 1:
            sl = w.index_select(0 if produces else 1, t)
            out.append(("weight" if axis == 0 else "weight_in", sl.movedim(0 if produces else 1, 0).reshape(n, -1)))
        elif produces:
            out.append(("weight" if axis == 0 else "weight_in", w[t].reshape(n, -1)))
        else:  # per-group axis: channel i is column i % per_group of its group's rows
            per_col = w.shape[1]
            per_row = w.shape[0] // g
            rows = (t // per_col)[:, None] * per_row + torch.arange(per_row, device=w.device)[None, :]
            sl = w[rows, (t % per_col)[:, None]]
            out.append(("weight" if axis == 0 else "weight_in", sl.reshape(n, -1)))
        return out

    def _sizes(self, m: nn.Module, path: str, s: SizeContext) -> tuple[int, int, int]:
        cout, cin = s.axis(path, 0), s.axis(path, 1)
        groups = 1 if m.groups == 1 else cin // (m.in_channels // m.groups)
        return cout, cin, groups

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        m = node.graph.owning_module.get_submodule(node.target)
        cout, cin, groups = self._sizes(m, node.target, s)
        k = math.prod(m.kernel_size)
        if self.transposed:
            return math.prod(s.shape(node.args[0])) * (cout // groups) * k
        return math.prod(s.shape(node)) * (cin // groups) * k

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        m = gm.get_submodule(path)
        cout, cin, groups = self._sizes(m, path, s)
        bias = cout if m.bias is not None else 0
        return cout * (cin // groups) * math.prod(m.kernel_size) + bias


@register_op(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(_ConvBase):
    name = "conv"


@register_op(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(_ConvBase):
    name = "conv_transpose"
    transposed = True
