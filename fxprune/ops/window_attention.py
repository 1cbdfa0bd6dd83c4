"""Swin window attention as a known function: torchvision's ``shifted_window_attention`` (v1 and v2).

torchvision wraps ``shifted_window_attention`` and ``_get_relative_position_bias`` with ``torch.fx.wrap``, so a
traced Swin holds them as single ``call_function`` nodes whose weights arrive as ``get_attr`` tensors. This rule
reads the head structure from those arguments:

* rows of ``qkv_weight`` (and ``qkv_bias``) split as ``(3, heads, head_dim)``;
* columns of ``proj_weight`` split as ``(heads, head_dim)``;
* dim 1 of the relative position bias (``[1, heads, N, N]``) and dim 0 of v2's ``logit_scale`` (``[heads, 1, 1]``).

All of one head's slots form one unit, so pruning removes whole heads. The bias follows through
``_get_relative_position_bias`` (its table's head column, see ``RelativeBiasRule``) back to the
``relative_position_bias_table`` (v1) or to v2's ``cpb_mlp`` last ``Linear`` (through the ``view(-1, heads)``,
whose constant is rewritten). The embedding dim of the input and of the output pass to ``qkv_weight``'s
columns and ``proj_weight``'s rows.

Under the ``head_dim`` stage (analysis option ``qkv_factor: head_dim``, see ``ops/attention.py``) the units are per-head
features instead (a unit cannot be both "head h" and "feature d"): feature ``d`` of every head's q and k (v1 only:
v2's cosine attention normalizes over them, so they stay frozen) and feature ``d`` of every head's v with the
``proj`` columns reading it. The query scale is then pinned to the original ``head_dim ** -0.5``.

After shrinking, the node calls ``window_attention`` below: the same computation, but with the inner widths
(``heads * qk_dim``, ``heads * v_dim``) read from the weights instead of the input's channel count, and
``num_heads`` rewritten. A removed head is exact under masking: its q, k, v are zero, so its output
``softmax(bias) @ v`` is zero (v2's cosine attention normalizes a zero vector to zero).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import Port, Space, arange
from ..ir.spec import spec_of
from . import attention
from .io import AttributeRule
from .registry import OpRule, arg, register_functions, register_op
from .tensor_attr import index_tensor, resolve

#: argument positions of ``shifted_window_attention`` (and of ``window_attention``).
ARGS = {"input": 0, "qkv_weight": 1, "proj_weight": 2, "relative_position_bias": 3, "window_size": 4,
        "num_heads": 5, "shift_size": 6, "attention_dropout": 7, "dropout": 8, "qkv_bias": 9, "proj_bias": 10,
        "logit_scale": 11, "training": 12}
#: how a criterion sees each axis of each weight argument (see ``ops.registry.ROLES``).
_ROLES = {("qkv_weight", 0): "weight", ("qkv_weight", 1): "weight_in", ("proj_weight", 0): "weight",
          ("proj_weight", 1): "weight_in", ("qkv_bias", 0): "bias", ("proj_bias", 0): "bias"}
BIAS_REASON = "relative position bias: window positions are fixed by the window size"
COSINE_REASON = "cosine attention (Swin v2) normalizes q and k over their features (removing one changes the rest)"


def _region_ids(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Which of the three shifted-window regions each row (or column) of a padded map falls in."""
    pos = torch.arange(size, device=device)
    return (pos >= size - window).long() + (pos >= size - shift).long()


def window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: Sequence[int],
    num_heads: int,
    shift_size: Sequence[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
    v_dim: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """(Shifted) window multi-head self-attention whose inner widths may differ from the input's channels.

    Computes what torchvision's ``shifted_window_attention`` computes, with the head widths read from the weights
    instead of ``C // num_heads``, so heads, per-head features and the embedding dim can be pruned separately.

    Args:
        input: ``[B, H, W, C]``.
        qkv_weight: ``[heads * (2 * qk_dim + v_dim), C]`` (q, k, v rows); proj_weight: ``[C_out, heads * v_dim]``.
        relative_position_bias: broadcastable to ``[windows * B, heads, N, N]`` with ``N = wh * ww``.
        logit_scale: ``[heads, 1, 1]`` for cosine attention (Swin v2), else ``None``.
        v_dim: per-head value width; ``None``: q, k and v are equally wide.
        scale: the query scale of dot-product attention; ``None``: ``qk_dim ** -0.5``.
    Returns:
        ``[B, H, W, C_out]``.
    """
    b, h, w, c = input.shape
    wh, ww = window_size[0], window_size[1]
    qk_dim, v_dim = head_dims(qkv_weight.shape[0], num_heads, v_dim)
    nq, inner = num_heads * qk_dim, num_heads * v_dim
    x = F.pad(input, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = x.shape[1], x.shape[2]
    sh = 0 if wh >= hp else shift_size[0]
    sw = 0 if ww >= wp else shift_size[1]
    if sh + sw > 0:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw = hp // wh, wp // ww
    tokens = wh * ww
    x = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, tokens, c)
    if logit_scale is not None and qkv_bias is not None:  # v2 keeps no key bias
        qkv_bias = torch.cat([qkv_bias[:nq], torch.zeros_like(qkv_bias[nq:2 * nq]), qkv_bias[2 * nq:]])
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = (t.reshape(x.shape[0], tokens, num_heads, -1).transpose(1, 2) for t in qkv.split([nq, nq, inner], -1))
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (qk_dim ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sh + sw > 0:
        ids = _region_ids(hp, wh, sh, x.device)[:, None] * 3 + _region_ids(wp, ww, sw, x.device)[None, :]
        ids = ids.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, tokens)
        same = ids[:, None, :] == ids[:, :, None]
        mask = torch.where(same, 0.0, -100.0).to(attn.dtype)
        attn = attn.view(b, nh * nw, num_heads, tokens, tokens) + mask[None, :, None]
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], tokens, inner)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    c_out = x.shape[-1]
    x = x.view(b, nh, nw, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c_out)
    if sh + sw > 0:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


torch.fx.wrap("window_attention")


def head_dims(rows: int, heads: int, v_dim: int | None = None) -> tuple[int, int]:
    """(q/k width, v width) per head of a packed ``qkv`` with ``rows`` rows."""
    if v_dim is None:
        return rows // (3 * heads), rows // (3 * heads)
    return (rows - heads * v_dim) // (2 * heads), v_dim


def _weight_port(node: fx.Node, c: Coupling, name: str) -> Port | None:
    return c.port(arg(node, ARGS[name], name))


@register_op(window_attention)
class WindowAttentionRule(AttributeRule):
    """Heads of a (shifted) window attention call are units; see the module docstring.

    The rule also owns the parameter axes of the weights passed in as ``get_attr`` tensors, so criteria read
    ``qkv_weight`` rows and ``proj_weight`` columns as weights (not as anonymous attributes); slicing and counting
    them is the attribute rule's.
    """

    name = "window_attention"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = _weight_port(node, c, "input"), c.out()
        w_qkv, w_proj = _weight_port(node, c, "qkv_weight"), _weight_port(node, c, "proj_weight")
        bias = _weight_port(node, c, "relative_position_bias")
        heads = arg(node, ARGS["num_heads"], "num_heads")
        if (None in (x, y, w_qkv, w_proj, bias) or not isinstance(heads, int) or bias.ndim != 4
                or bias.shape[1] != heads):
            return
        dq, dv = head_dims(w_qkv.shape[0], heads, node.kwargs.get("v_dim"))
        if w_proj.shape[1] != heads * dv or w_qkv.shape[0] != heads * (2 * dq + dv):
            return
        for d in range(3):
            c.tie_dims(x, d, y, d)
        c.tie(x.space(3), w_qkv.space(1), size=x.shape[3])
        c.tie(y.space(3), w_proj.space(0), size=y.shape[3])
        if attention.preferred_factor(c.options) == "head_dim":
            self._tie_head_dims(node, c, heads, dq, dv)
        else:
            rows = arange(w_qkv.shape[0])
            head = np.where(rows < 2 * heads * dq, (rows % (heads * dq)) // dq, (rows - 2 * heads * dq) // dv)
            c.tie(w_qkv.space(0), bias.space(1), rows, head)
            c.tie(w_proj.space(1), bias.space(1), arange(heads * dv), arange(heads * dv) // dv)
        for name, other, dim in (("qkv_bias", w_qkv.space(0), 0), ("proj_bias", w_proj.space(0), 0),
                                 ("logit_scale", bias.space(1), 0)):
            p = _weight_port(node, c, name)
            if p is not None:
                c.tie(p.space(dim), other, size=p.shape[dim])
        for name in _owned(node):  # own the weights' parameter axes (see the class docstring)
            a = arg(node, ARGS[name], name)
            for d, n in enumerate(c.port(a).shape):
                c.tie(c.port(a).space(d), c.param(d, n, target=str(a.target)))

    def _tie_head_dims(self, node: fx.Node, c: Coupling, heads: int, dq: int, dv: int) -> None:
        """Under the ``head_dim`` stage: feature ``d`` of every head's q and k is one unit, feature ``d`` of every
        head's v (with the ``proj`` columns reading it) another. Cosine attention (v2) normalizes q and k over
        their features, so there only v features are units."""
        w_qkv, w_proj = _weight_port(node, c, "qkv_weight"), _weight_port(node, c, "proj_weight")
        nq = heads * dq
        qk = np.concatenate([arange(nq), nq + arange(nq)])
        if _weight_port(node, c, "logit_scale") is None:
            c.tie(w_qkv.space(0), w_qkv.space(0), qk, qk % dq)
        else:
            c.freeze(w_qkv.space(0), f"{COSINE_REASON}: {node.format_node()}", qk)
        v = arange(heads * dv)
        c.tie(w_qkv.space(0), w_qkv.space(0), 2 * nq + v, 2 * nq + v % dv)
        c.tie(w_proj.space(1), w_qkv.space(0), v, 2 * nq + v % dv)

    def head_dim_spaces(self, node: fx.Node) -> list[Space]:
        """The space holding the per-head features (used by the ``head_dim`` stage): the ``qkv`` rows."""
        w = arg(node, ARGS["qkv_weight"], "qkv_weight")
        return [Space(w.name, 0, 0)] if isinstance(w, fx.Node) else []

    def frozen_reason(self, node: fx.Node, space: Space) -> str:
        if space.owner == getattr(arg(node, 3, "relative_position_bias"), "name", None):
            return f"{BIAS_REASON}: {node.format_node()}"
        return super().frozen_reason(node, space)

    def head_spaces(self, node: fx.Node) -> list[Space]:
        """The spaces whose slots are whole attention heads (used by the ``heads`` stage): the bias' head dim."""
        bias = arg(node, ARGS["relative_position_bias"], "relative_position_bias")
        return [Space(bias.name, 0, 1)] if isinstance(bias, fx.Node) else []

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        bias = arg(node, ARGS["relative_position_bias"], "relative_position_bias")
        w_qkv = arg(node, ARGS["qkv_weight"], "qkv_weight")
        old_heads = arg(node, ARGS["num_heads"], "num_heads")
        dq, dv = head_dims(spec_of(w_qkv).shape[0], old_heads, node.kwargs.get("v_dim"))
        heads = r.shape(bias)[1]
        kept = r.kept(Space(w_qkv.name, 0, 0))
        kwargs = dict(node.kwargs)
        if kept is not None:
            new_dq = int((kept < old_heads * dq).sum()) // heads
            new_dv = int((kept >= 2 * old_heads * dq).sum()) // heads
            if new_dv != new_dq or "v_dim" in kwargs:
                kwargs["v_dim"] = new_dv
            if new_dq != dq and kwargs.get("scale") is None:
                kwargs["scale"] = dq ** -0.5  # the original temperature: shrunk == masked
        node.target = window_attention
        args = list(node.args)
        if len(args) > ARGS["num_heads"]:
            args[ARGS["num_heads"]] = heads
        else:
            kwargs["num_heads"] = heads
        node.args, node.kwargs = tuple(args), kwargs

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        role = next((_ROLES.get((name, axis)) for n in gm.graph.nodes if n.op == "get_attr" and n.target == path
                     for user in n.users for name in _owned(user) if arg(user, ARGS[name], name) is n), None)
        if role is None:
            return super().param_slices(gm, path, axis, idx)
        owner, attr = resolve(gm, path)
        t = getattr(owner, attr).detach()
        return [(role, t.index_select(axis, index_tensor(idx, t.device)).movedim(axis, 0).reshape(len(idx), -1))]

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        b, h, w, c = s.shape(arg(node, 0, "input"))
        wh, ww = arg(node, ARGS["window_size"], "window_size")
        rows = s.shape(arg(node, ARGS["qkv_weight"], "qkv_weight"))[0]
        inner = s.shape(arg(node, ARGS["proj_weight"], "proj_weight"))[1]  # heads * v_dim
        c_out = s.shape(node)[-1]
        tokens = b * (-(-h // wh) * wh) * (-(-w // ww) * ww)
        return tokens * (c * rows + wh * ww * ((rows - inner) // 2 + inner) + inner * c_out)


def _owned(node: fx.Node) -> list[str]:
    """The weight arguments of a window attention node that are ``get_attr`` tensors."""
    if node.op != "call_function" or node.target not in _TARGETS:
        return []
    names = ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias", "logit_scale")
    return [n for n in names if isinstance(a := arg(node, ARGS[n], n), fx.Node) and a.op == "get_attr"]


_TARGETS: set = {window_attention}


class RelativeBiasRule(OpRule):
    """``_get_relative_position_bias(table[L, heads], index, window_size) -> [1, heads, N, N]``: heads pass."""

    name = "relative_position_bias"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        table, y = c.port(node.args[0]), c.out()
        if table is not None and y is not None and table.ndim == 2 and y.ndim == 4:
            c.tie_dims(table, 1, y, 1)

    def frozen_reason(self, node: fx.Node, space: Space) -> str:
        return f"{BIAS_REASON}: {node.format_node()}"


class PatchMergingPadRule(OpRule):
    """``_patch_merging_pad(x[..., H, W, C]) -> [..., H/2, W/2, 4C]``: four strided copies concatenated on channels.

    Channel ``c`` of the input becomes channels ``c, C + c, 2C + c, 3C + c``; leading dims pass; the halved
    spatial dims are frozen.
    """

    name = "patch_merging_pad"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None or x.ndim != y.ndim or y.shape[-1] != 4 * x.shape[-1]:
            return
        for d in range(x.ndim - 3):
            c.tie_dims(x, d, y, d)
        n = x.shape[-1]
        for k in range(4):
            c.tie(x.space(-1), y.space(-1), arange(n), k * n + arange(n))


def register_torchvision() -> None:
    """Register torchvision's Swin functions (when torchvision is installed)."""
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:  # torchvision is optional
        return
    _TARGETS.add(swin.shifted_window_attention)
    register_functions(WindowAttentionRule, [swin.shifted_window_attention])
    register_op(swin._get_relative_position_bias)(RelativeBiasRule)
    register_op(swin._patch_merging_pad)(PatchMergingPadRule)


register_torchvision()
