"""How the latency table times one layer of a graph: the real op at given kept widths.

An ``OpModel`` describes a prunable layer's op (convolution, linear layer, scaled-dot-product attention) by at most
two widths ``(a, b)`` (output and input channels; heads and head dim), read from a ``SizeContext`` by ``widths``,
and builds the op at any widths with random tensors of the layer's device and dtype (``call``). Everything else
(batch size, tokens, spatial size, kernel, stride, groups per channel) is fixed and part of its ``signature``.

A layer whose op has no model here (``nn.MultiheadAttention``, matmuls, transposed convolutions) is costed by MACs
(see ``table.py``): ``scale_by_macs`` ops are timed once at full size and scaled by their MACs.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ir.context import SizeContext
from ..ir.space import Space
from ..ir.spec import TensorSpec, spec_of
from ..ops.registry import OpRule, arg


@dataclass(eq=False)
class OpModel:
    """One timed layer. ``full``: its widths unpruned; ``one_d``: only ``a`` varies (``b`` follows it)."""

    node: str
    signature: str
    full: tuple[int, int]
    widths: Callable[[SizeContext], tuple[int, int]]
    call: Callable[[int, int, torch.device, torch.dtype], Callable[[], object]]
    spaces: tuple[Space | None, Space | None] = (None, None)  # the spaces widths a and b are sizes of
    one_d: bool = False


def _shape(node: Any) -> tuple[int, ...] | None:
    spec = spec_of(node) if isinstance(node, fx.Node) else None
    return tuple(spec.shape) if isinstance(spec, TensorSpec) else None


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _conv(node: fx.Node, m: nn.Module, rule: OpRule) -> OpModel | None:
    x = _shape(node.args[0])
    if x is None or getattr(rule, "transposed", False) or not isinstance(m.padding, (tuple, int)):
        return None
    nd = len(m.kernel_size)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    per_group_in = m.in_channels // m.groups
    grouped = m.groups > 1
    mult = m.out_channels // m.groups if grouped else 0  # output channels per group
    path = str(node.target)
    opts = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
    sig = (f"conv{nd}d|x={x[0]}x*x{_dims(x[2:])}|k={_dims(m.kernel_size)}|s={_dims(m.stride)}|p={m.padding}"
           f"|d={_dims(m.dilation)}|gin={per_group_in if grouped else 0}|mult={mult}|bias={m.bias is not None}")

    def widths(s: SizeContext) -> tuple[int, int]:
        if grouped:
            return s.axis(path, 1), 0
        return s.axis(path, 0), s.axis(path, 1)

    def call(a: int, b: int, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
        cin = a if grouped else b
        groups = cin // per_group_in if grouped else 1
        cout = groups * mult if grouped else a
        xt = torch.randn(x[0], cin, *x[2:], device=device, dtype=dtype)
        w = torch.randn(cout, cin // groups, *m.kernel_size, device=device, dtype=dtype)
        bias = torch.randn(cout, device=device, dtype=dtype) if m.bias is not None else None
        return lambda: conv(xt, w, bias, groups=groups, **opts)

    full = (m.in_channels, 0) if grouped else (m.out_channels, m.in_channels)
    a_space, b_space = Space("@" + path, 0, 0), Space("@" + path, 0, 1)
    spaces = (b_space, None) if grouped else (a_space, b_space)
    return OpModel(node.name, sig, full, widths, call, spaces, one_d=grouped)


def _linear(node: fx.Node, x: tuple[int, ...], out: int, inp: int, bias: bool,
            widths: Callable[[SizeContext], tuple[int, int]], owner: str) -> OpModel:
    tokens = math.prod(x[:-1])
    sig = f"linear|tokens={tokens}|bias={bias}"

    def call(a: int, b: int, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
        xt = torch.randn(tokens, b, device=device, dtype=dtype)
        w = torch.randn(a, b, device=device, dtype=dtype)
        bt = torch.randn(a, device=device, dtype=dtype) if bias else None
        return lambda: F.linear(xt, w, bt)

    return OpModel(node.name, sig, (out, inp), widths, call, (Space(owner, 0, 0), Space(owner, 0, 1)))


def _sdpa(node: fx.Node) -> OpModel | None:
    q, k, v = (_shape(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None or not len(q) == len(k) == len(v) == 4:
        return None
    qn = arg(node, 0, "query")
    causal = bool(arg(node, 5, "is_causal") or False)
    if arg(node, 3, "attn_mask") is not None:
        return None
    sig = f"sdpa|b={q[0]}|nq={q[2]}|nk={k[2]}|dv/dq={v[3]}/{q[3]}|causal={causal}"

    def widths(s: SizeContext) -> tuple[int, int]:
        return s.shape(qn)[1], s.shape(qn)[3]

    def call(a: int, b: int, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
        dv = max(1, round(v[3] * b / q[3]))
        qt = torch.randn(q[0], a, q[2], b, device=device, dtype=dtype)
        kt = torch.randn(k[0], a, k[2], b, device=device, dtype=dtype)
        vt = torch.randn(v[0], a, v[2], dv, device=device, dtype=dtype)
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return OpModel(node.name, sig, (q[1], q[3]), widths, call, (Space(qn.name, 0, 1), Space(qn.name, 0, 3)))


def op_model(node: fx.Node, rule: OpRule) -> OpModel | None:
    """The timed model of ``node``'s op, or ``None`` when the table costs it by MACs."""
    gm = node.graph.owning_module
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        path = str(node.target)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return _conv(node, m, rule)
        if isinstance(m, nn.Linear):
            x = _shape(node.args[0])
            if x is None:
                return None
            return _linear(node, x, m.out_features, m.in_features, m.bias is not None,
                           lambda s: (s.axis(path, 0), s.axis(path, 1)), "@" + path)
        return None
    if node.target is F.linear:
        x, w = _shape(node.args[0]), _shape(arg(node, 1, "weight"))
        if x is None or w is None or len(w) != 2:
            return None
        wn, bias = arg(node, 1, "weight"), arg(node, 2, "bias") is not None
        return _linear(node, x, w[0], w[1], bias, lambda s: (s.shape(wn)[0], s.shape(wn)[1]), wn.name)
    if node.target is F.scaled_dot_product_attention:
        return _sdpa(node)
    return None


__all__ = ["OpModel", "op_model"]
