"""torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` as a leaf whose heads are its own axis.

Parameter axes of the module:

* axis 0, **heads**: a unit is one head: its q, k and v rows of ``to_qkv`` (weight and bias), its column of
  ``relative_position_bias_table`` and its ``head_dim`` columns of ``merge``. Zeroing a head's rows makes its
  output ``softmax(...) @ v`` exactly zero, so removing it equals masking it. This axis is internal (no graph
  tensor shows it), so it forms its own group; the oracle masks it through ``mask_removed``.
* axis 1 / 2: input features (``to_qkv`` columns, tied to the input's last dim) and output features (``merge``
  rows, tied to the output's last dim). In MaxViT they sit between a LayerNorm and a residual add, so they stay
  frozen there.
* axis 3, **q/k head dim**: feature ``d`` of every head's queries and keys (a zeroed pair adds nothing to q·k, and
  MaxViT's key scale ``feat_dim ** -0.5`` is a constant, so it stays exact);
* axis 4, **v head dim**: feature ``d`` of every head's values and the ``merge`` columns reading it.

Like ``nn.MultiheadAttention`` (``attention_mha.py``), heads and head dims are separate internal axes, so channel
stages prune both, the ``heads`` stage the heads and the ``head_dim`` stage the head dims. Shrinking swaps the
module for ``PrunedRelPosAttention`` (``maxvit_attention.py``), which this rule also handles.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import Space
from .maxvit_attention import PrunedRelPosAttention, RelativePositionalMultiHeadAttention, layout, merge_cols, qkv_rows
from .registry import OpRule, register_op
from .tensor_attr import index_tensor, resolve

HEADS, IN_FEATURES, OUT_FEATURES, QK_DIM, V_DIM = range(5)


def _layout(m: nn.Module) -> tuple[int, int, int, int, int]:
    """Sizes of the five axes, in axis order."""
    h, dq, dv = layout(m)
    return h, m.to_qkv.in_features, m.merge.out_features, dq, dv


class RelPosAttentionRule(OpRule):
    """Heads (axis 0), input (1) and output (2) features, q/k (3) and v (4) head dims of MaxViT's attention."""

    name = "maxvit_attention"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        m = c.module()
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None or x.ndim != 4 or y.ndim != 4:
            return
        h, n_in, n_out, dq, dv = _layout(m)
        c.param(HEADS, h)
        c.param(QK_DIM, dq)
        c.param(V_DIM, dv)
        for d in range(3):  # batch, partitions, tokens of a partition
            c.tie_dims(x, d, y, d)
        c.tie(x.space(3), c.param(IN_FEATURES, n_in))
        c.tie(y.space(3), c.param(OUT_FEATURES, n_out))

    def head_spaces(self, node: fx.Node) -> list[Space]:
        """The heads axis (used by the ``heads`` stage)."""
        return [Space("@" + str(node.target), 0, HEADS)]

    def head_dim_spaces(self, node: fx.Node) -> list[Space]:
        """The q/k and v head-dim axes (used by the ``head_dim`` stage)."""
        return [Space("@" + str(node.target), 0, QK_DIM), Space("@" + str(node.target), 0, V_DIM)]

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        kept = []
        for axis, n in enumerate(_layout(m)):
            k = r.kept_param(path, axis)
            kept.append(torch.as_tensor(np.arange(n) if k is None else np.asarray(k), dtype=torch.long))
        heads, inputs, outputs, qk, v = kept
        owner, name = resolve(gm, path)
        setattr(owner, name, PrunedRelPosAttention.select(m, heads, qk, v, inputs, outputs))

    def mask_removed(self, m: nn.Module, axis: int, removed: np.ndarray) -> None:
        """Zero, in place, what the removed units of ``axis`` own (the oracle's masked model; see testing.py)."""
        h, _, _, dq, dv = _layout(m)
        gone = index_tensor(removed, m.to_qkv.weight.device)
        every = [torch.arange(n, device=gone.device) for n in (h, dq, dv)]
        none = gone[:0]
        with torch.no_grad():
            if axis in (HEADS, QK_DIM, V_DIM):
                pick = {HEADS: (gone, every[1], every[2]), QK_DIM: (every[0], gone, none),
                        V_DIM: (every[0], none, gone)}[axis]
                rows = torch.cat([r.reshape(-1) for r in qkv_rows(m, *pick)])
                m.to_qkv.weight[rows] = 0
                if m.to_qkv.bias is not None:
                    m.to_qkv.bias[rows] = 0
                if axis != QK_DIM:
                    m.merge.weight[:, merge_cols(m, pick[0], pick[2]).reshape(-1)] = 0
                if axis == HEADS:
                    m.relative_position_bias_table[:, gone] = 0
            elif axis == IN_FEATURES:
                m.to_qkv.weight[:, gone] = 0
            elif axis == OUT_FEATURES:
                m.merge.weight[gone] = 0
                if m.merge.bias is not None:
                    m.merge.bias[gone] = 0

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        m = gm.get_submodule(path)
        h, _, _, dq, dv = _layout(m)
        w, wm = m.to_qkv.weight.detach(), m.merge.weight.detach()
        t = index_tensor(idx, w.device)
        if axis == IN_FEATURES:
            return [("weight_in", w[:, t].t())]
        if axis == OUT_FEATURES:
            out = [("weight", wm[t])]
            return out + ([("bias", m.merge.bias.detach()[t].reshape(-1, 1))] if m.merge.bias is not None else [])
        every = [torch.arange(n, device=w.device) for n in (h, dq, dv)]
        if axis == HEADS:  # rows and columns per head: [units, features]
            rows = torch.cat(qkv_rows(m, t, every[1], every[2]), 1)
            cols = merge_cols(m, t, every[2])
        elif axis == QK_DIM:  # per feature: its q and k rows in every head
            q, k, _ = qkv_rows(m, every[0], t, t[:0])
            rows, cols = torch.cat([q.t(), k.t()], 1), None
        else:
            rows = qkv_rows(m, every[0], t[:0], t)[2].t()
            cols = merge_cols(m, every[0], t).t()
        out = [("weight", w[rows.reshape(-1)].reshape(len(t), -1))]
        if cols is not None:
            read = wm[:, cols.reshape(-1)].reshape(-1, *cols.shape).permute(1, 0, 2)
            out.append(("weight_in", read.reshape(len(t), -1)))
        if axis == HEADS:
            out.append(("attr", m.relative_position_bias_table.detach()[:, t].t()))
        if m.to_qkv.bias is not None:
            out.append(("bias", m.to_qkv.bias.detach()[rows.reshape(-1)].reshape(len(t), -1)))
        return out

    def _sizes(self, path: str, m: nn.Module, s: SizeContext) -> tuple[int, ...]:
        try:
            return tuple(s.axis(path, a) for a in range(5))
        except KeyError:  # not analysed as prunable here: the module's own sizes
            return _layout(m)

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        m = node.graph.owning_module.get_submodule(node.target)
        h, n_in, n_out, dq, dv = self._sizes(str(node.target), m, s)
        b, g, p, _ = s.shape(node.args[0])
        rows = h * (2 * dq + dv)
        return b * g * p * (n_in * rows + p * h * (dq + dv) + h * dv * n_out)

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        m = gm.get_submodule(path)
        h, n_in, n_out, dq, dv = self._sizes(path, m, s)
        rows = h * (2 * dq + dv)
        table = m.relative_position_bias_table.shape[0] * h
        return rows * (n_in + (m.to_qkv.bias is not None)) + n_out * (h * dv + (m.merge.bias is not None)) + table


if RelativePositionalMultiHeadAttention is not None:
    register_op(RelativePositionalMultiHeadAttention, PrunedRelPosAttention)(RelPosAttentionRule)

__all__ = ["RelPosAttentionRule", "PrunedRelPosAttention"]
