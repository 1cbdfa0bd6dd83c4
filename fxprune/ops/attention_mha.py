"""``nn.MultiheadAttention`` (e.g. torchvision's ViT) as a leaf whose heads and head dims are its own axes.

Parameter axes of the module (each its own group, since nothing outside the module sees them):

* axis 0, **heads**: a unit is one head, i.e. its q, k and v rows of ``in_proj_weight``/``in_proj_bias`` and its
  columns of ``out_proj.weight``. Zeroing a head's q/k/v rows makes its output exactly zero (uniform softmax over
  zero values), so removing it equals masking it.
* axis 1, **q/k head dim**: feature d of every head's queries and keys (the scale stays the original one);
* axis 2, **v head dim**: feature d of every head's values and the ``out_proj`` columns reading it;
* axis 3 / 4: input features (``in_proj_weight`` columns, tied to the last dim of query, key and value) and output
  features (``out_proj`` rows, tied to the output's last dim). In a ViT the residual stream feeds a LayerNorm, so
  they stay frozen there.

Shrinking swaps the module for ``fxprune.nn.PrunedMultiheadAttention``, which this rule also handles, so later
stages can prune it again. Only calls with ``need_weights=False`` (what torchvision's encoder passes) and without a
per-head 3-D ``attn_mask`` are prunable: averaged attention weights would differ from the masked model's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import Space
from ..nn.attention import PrunedMultiheadAttention
from .attention import KEY_TOKENS_REASON
from .registry import OpRule, arg, register_op
from .tensor_attr import index_tensor, resolve

HEADS, QK_DIM, V_DIM, IN_FEATURES, OUT_FEATURES = range(5)


def _layout(m: nn.Module) -> tuple[int, int, int, int, int]:
    """(heads, q/k head dim, v head dim, input features, output features) of either module type."""
    if isinstance(m, PrunedMultiheadAttention):
        return m.num_heads, m.qk_dim, m.v_dim, m.in_dim, m.out_dim
    head = m.embed_dim // m.num_heads
    return m.num_heads, head, head, m.embed_dim, m.embed_dim


def _why_not(m: nn.Module, node: fx.Node, c: Coupling) -> str | None:
    """Why this call's heads cannot be pruned, or ``None``."""
    if isinstance(m, nn.MultiheadAttention) and (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn):
        return "nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v or add_zero_attn is not supported"
    if arg(node, 4, "need_weights", True) is not False:
        return "MultiheadAttention called with need_weights=True (head-averaged weights would change)"
    mask = c.port(arg(node, 5, "attn_mask"))
    if mask is not None and mask.ndim == 3:
        return "MultiheadAttention called with a per-head 3-D attn_mask"
    return None


def _rows(m: nn.Module, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h, dq, dv, _, _ = _layout(m)
    hh = heads.reshape(-1, 1)
    q = (hh * dq + qk.reshape(1, -1)).reshape(len(heads), len(qk))
    vv = (2 * h * dq + hh * dv + v.reshape(1, -1)).reshape(len(heads), len(v))
    return torch.cat([q, q + h * dq, vv], 1)  # [heads, q | k | v features]


@register_op(nn.MultiheadAttention, PrunedMultiheadAttention)
class MultiheadAttentionRule(OpRule):
    """Heads (axis 0), q/k head dim (1), v head dim (2), input (3) and output (4) features."""

    name = "multihead_attention"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        m = c.module()
        q, k, v = (c.port(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
        y = c.out(0)
        if q is None or k is None or v is None or y is None:
            return
        reason = _why_not(m, node, c)
        if reason is not None:
            for d in range(y.ndim):
                c.freeze(y.space(d), reason)
            return
        h, dq, dv, n_in, n_out = _layout(m)
        c.param(HEADS, h)
        c.param(QK_DIM, dq)
        c.param(V_DIM, dv)
        bd = 0 if m.batch_first else 1
        for p in (q, k, v):
            c.tie_dims(p, bd, y, bd)
            c.tie(p.space(-1), c.param(IN_FEATURES, n_in))
        c.tie_dims(q, 1 - bd, y, 1 - bd)
        for p in (k, v):
            c.freeze(p.space(1 - bd), KEY_TOKENS_REASON)
        c.tie(y.space(-1), c.param(OUT_FEATURES, n_out))
        pad = c.port(arg(node, 3, "key_padding_mask"))
        if pad is not None:
            c.tie_dims(pad, 0, y, bd)

    def head_spaces(self, node: fx.Node) -> list[Space]:
        """The heads axis (used by the ``heads`` stage)."""
        return [Space("@" + str(node.target), 0, HEADS)]

    def head_dim_spaces(self, node: fx.Node) -> list[Space]:
        """The q/k and v head-dim axes (used by the ``head_dim`` stage)."""
        return [Space("@" + str(node.target), 0, QK_DIM), Space("@" + str(node.target), 0, V_DIM)]

    def frozen_reason(self, node: fx.Node, space: Space) -> str:
        return (f"multi-head attention keeps dim {space.dim} of '{space.owner}' (mask or key tokens): "
                f"{node.format_node()}")

    # -- rewriting ------------------------------------------------------------------------------------------------
    def _kept(self, m: nn.Module, path: str, r: RewriteContext) -> list[torch.Tensor]:
        sizes = _layout(m)
        out = []
        for axis, n in enumerate(sizes):
            kept = r.kept_param(path, axis)
            out.append(torch.as_tensor(np.arange(n) if kept is None else np.asarray(kept), dtype=torch.long))
        return out

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        pm = m if isinstance(m, PrunedMultiheadAttention) else PrunedMultiheadAttention.from_torch(m)
        owner, name = resolve(gm, path)
        setattr(owner, name, pm.select(*self._kept(m, path, r)))

    def mask_removed(self, m: nn.Module, axis: int, removed: np.ndarray) -> None:
        """Zero, in place, what the removed units of ``axis`` own (the oracle's masked model; see testing.py)."""
        h, dq, dv, n_in, n_out = _layout(m)
        gone = index_tensor(removed, m.in_proj_weight.device)
        every = [torch.arange(n) for n in (h, dq, dv)]
        with torch.no_grad():
            if axis in (HEADS, QK_DIM, V_DIM):
                pick = list(every)
                pick[axis] = gone
                if axis == QK_DIM:
                    pick[V_DIM] = torch.zeros(0, dtype=torch.long)
                if axis == V_DIM:
                    pick[QK_DIM] = torch.zeros(0, dtype=torch.long)
                rows = _rows(m, *pick).reshape(-1)
                m.in_proj_weight[rows] = 0
                if m.in_proj_bias is not None:
                    m.in_proj_bias[rows] = 0
            elif axis == IN_FEATURES:
                m.in_proj_weight[:, gone] = 0
            elif axis == OUT_FEATURES:
                m.out_proj.weight[gone] = 0
                if m.out_proj.bias is not None:
                    m.out_proj.bias[gone] = 0

    # -- scoring and counting -------------------------------------------------------------------------------------
    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        m = gm.get_submodule(path)
        h, dq, dv, n_in, n_out = _layout(m)
        w, b = m.in_proj_weight.detach(), m.in_proj_bias
        wo = m.out_proj.weight.detach()
        t = index_tensor(idx, w.device)
        if axis == IN_FEATURES:
            return [("weight_in", w[:, t].t())]
        if axis == OUT_FEATURES:
            out = [("weight", wo[t])]
            return out + ([("bias", m.out_proj.bias.detach()[t].reshape(-1, 1))] if m.out_proj.bias is not None else [])
        every = [torch.arange(n, device=w.device) for n in (h, dq, dv)]
        if axis == HEADS:
            rows = _rows(m, t, every[1], every[2])  # [units, features]
            cols = wo.reshape(n_out, h, dv)[:, t].permute(1, 0, 2).reshape(len(t), -1)
        elif axis == QK_DIM:
            rows = _rows(m, every[0], t, every[2][:0]).reshape(h, 2, len(t)).permute(2, 0, 1).reshape(len(t), -1)
            cols = None
        else:
            rows = _rows(m, every[0], every[1][:0], t).t()
            cols = wo.reshape(n_out, h, dv)[:, :, t].permute(2, 0, 1).reshape(len(t), -1)
        out = [("weight", w[rows.reshape(-1)].reshape(len(t), -1))]
        if b is not None:
            out.append(("bias", b.detach()[rows.reshape(-1)].reshape(len(t), -1)))
        if cols is not None:
            out.append(("weight_in", cols))
        return out

    def _sizes(self, path: str, m: nn.Module, s: SizeContext) -> list[int]:
        try:
            return [s.axis(path, a) for a in range(5)]
        except KeyError:  # not prunable here: the module's own sizes
            return list(_layout(m))

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        m = node.graph.owning_module.get_submodule(node.target)
        h, dq, dv, n_in, n_out = self._sizes(str(node.target), m, s)
        q, k = arg(node, 0, "query"), arg(node, 1, "key")
        bd = 0 if m.batch_first else 1
        qs, ks = s.shape(q), s.shape(k)
        batch, n_q, n_k = qs[bd], qs[1 - bd], ks[1 - bd]
        proj = n_q * n_in * h * dq + n_k * n_in * h * (dq + dv) + n_q * h * dv * n_out
        return batch * (proj + h * n_q * n_k * (dq + dv))

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        m = gm.get_submodule(path)
        h, dq, dv, n_in, n_out = self._sizes(path, m, s)
        rows = h * (2 * dq + dv)
        return (rows * n_in + (rows if m.in_proj_bias is not None else 0)
                + n_out * h * dv + (n_out if m.out_proj.bias is not None else 0))


__all__ = ["MultiheadAttentionRule", "PrunedMultiheadAttention"]
