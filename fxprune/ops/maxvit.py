"""torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` as a leaf whose heads are its own axis.

Parameter axes of the module:

* axis 0, **heads**: a unit is one head: its q, k and v rows of ``to_qkv`` (weight and bias), its column of
  ``relative_position_bias_table`` and its ``head_dim`` columns of ``merge``. Zeroing a head's rows makes its
  output ``softmax(...) @ v`` exactly zero, so removing it equals masking it. This axis is internal (no graph
  tensor shows it), so it forms its own group; the oracle masks it through ``mask_removed``.
* axis 1 / 2: input features (``to_qkv`` columns, tied to the input's last dim) and output features (``merge``
  rows, tied to the output's last dim). In MaxViT they sit between a LayerNorm and a residual add, so they stay
  frozen there.

The head dim is not offered: MaxViT scales keys by ``feat_dim ** -0.5`` and every head has the same width, so
removing feature ``d`` of one head would need ragged heads. Shrinking swaps the module for
``PrunedRelPosAttention`` (``maxvit_attention.py``), which this rule also handles.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..graph.coupling import Coupling
from ..graph.space import Space
from ..passes.context import RewriteContext, SizeContext
from .maxvit_attention import PrunedRelPosAttention, RelativePositionalMultiHeadAttention, merge_cols, qkv_rows
from .registry import OpRule, register_op
from .tensor_attr import index_tensor, resolve

HEADS, IN_FEATURES, OUT_FEATURES = range(3)


def _layout(m: nn.Module) -> tuple[int, int, int, int]:
    """(heads, head dim, input features, output features)."""
    return m.n_heads, m.head_dim, m.to_qkv.in_features, m.merge.out_features


class RelPosAttentionRule(OpRule):
    """Heads (axis 0), input features (1) and output features (2) of MaxViT's attention."""

    name = "maxvit_attention"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        m = c.module()
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None or x.ndim != 4 or y.ndim != 4:
            return
        h, _, n_in, n_out = _layout(m)
        c.param(HEADS, h)
        for d in range(3):  # batch, partitions, tokens of a partition
            c.tie_dims(x, d, y, d)
        c.tie(x.space(3), c.param(IN_FEATURES, n_in))
        c.tie(y.space(3), c.param(OUT_FEATURES, n_out))

    def head_spaces(self, node: fx.Node) -> list[Space]:
        """The heads axis (used by the ``heads`` stage)."""
        return [Space("@" + str(node.target), 0, HEADS)]

    def _kept(self, m: nn.Module, path: str, r: RewriteContext) -> list[torch.Tensor]:
        h, _, n_in, n_out = _layout(m)
        out = []
        for axis, n in ((HEADS, h), (IN_FEATURES, n_in), (OUT_FEATURES, n_out)):
            kept = r.kept_param(path, axis)
            out.append(torch.as_tensor(np.arange(n) if kept is None else np.asarray(kept), dtype=torch.long))
        return out

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        owner, name = resolve(gm, path)
        setattr(owner, name, PrunedRelPosAttention.select(m, *self._kept(m, path, r)))

    def mask_removed(self, m: nn.Module, axis: int, removed: np.ndarray) -> None:
        """Zero, in place, what the removed units of ``axis`` own (the oracle's masked model; see testing.py)."""
        h, dh, _, _ = _layout(m)
        gone = index_tensor(removed, m.to_qkv.weight.device)
        with torch.no_grad():
            if axis == HEADS:
                rows = qkv_rows(gone, h, dh).reshape(-1)
                m.to_qkv.weight[rows] = 0
                if m.to_qkv.bias is not None:
                    m.to_qkv.bias[rows] = 0
                m.merge.weight[:, merge_cols(gone, dh).reshape(-1)] = 0
                m.relative_position_bias_table[:, gone] = 0
            elif axis == IN_FEATURES:
                m.to_qkv.weight[:, gone] = 0
            elif axis == OUT_FEATURES:
                m.merge.weight[gone] = 0
                if m.merge.bias is not None:
                    m.merge.bias[gone] = 0

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        m = gm.get_submodule(path)
        h, dh, _, _ = _layout(m)
        w, wm = m.to_qkv.weight.detach(), m.merge.weight.detach()
        t = index_tensor(idx, w.device)
        if axis == IN_FEATURES:
            return [("weight_in", w[:, t].t())]
        if axis == OUT_FEATURES:
            out = [("weight", wm[t])]
            return out + ([("bias", m.merge.bias.detach()[t].reshape(-1, 1))] if m.merge.bias is not None else [])
        rows = qkv_rows(t, h, dh)
        out = [("weight", w[rows.reshape(-1)].reshape(len(t), -1)),
               ("weight_in", wm[:, merge_cols(t, dh).reshape(-1)].reshape(-1, len(t), dh).permute(1, 0, 2).reshape(len(t), -1)),
               ("attr", m.relative_position_bias_table.detach()[:, t].t())]
        if m.to_qkv.bias is not None:
            out.append(("bias", m.to_qkv.bias.detach()[rows.reshape(-1)].reshape(len(t), -1)))
        return out

    def _sizes(self, path: str, m: nn.Module, s: SizeContext) -> tuple[int, int, int, int]:
        h, dh, n_in, n_out = _layout(m)
        try:
            return s.axis(path, HEADS), dh, s.axis(path, IN_FEATURES), s.axis(path, OUT_FEATURES)
        except KeyError:  # not analysed as prunable here: the module's own sizes
            return h, dh, n_in, n_out

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        m = node.graph.owning_module.get_submodule(node.target)
        h, dh, n_in, n_out = self._sizes(str(node.target), m, s)
        b, g, p, _ = s.shape(node.args[0])
        inner = h * dh
        return b * g * p * (n_in * 3 * inner + 2 * p * inner + inner * n_out)

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        m = gm.get_submodule(path)
        h, dh, n_in, n_out = self._sizes(path, m, s)
        inner = h * dh
        table = m.relative_position_bias_table.shape[0] * h
        return (3 * inner * (n_in + (m.to_qkv.bias is not None)) + n_out * (inner + (m.merge.bias is not None)) + table)


if RelativePositionalMultiHeadAttention is not None:
    register_op(RelativePositionalMultiHeadAttention, PrunedRelPosAttention)(RelPosAttentionRule)

__all__ = ["RelPosAttentionRule", "PrunedRelPosAttention"]
