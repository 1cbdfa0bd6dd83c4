"""Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``; GPT-2's attention and MLP layers): a linear layer whose
weight is stored transposed, ``(in_features, out_features)``, with ``nf`` output features. Param axis 0 = output
features (weight columns, bias), axis 1 = input features (weight rows); leading dims pass through."""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.fx as fx

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from .registry import OpRule, register_op
from .tensor_attr import index_tensor, slice_attr

_DONE: list[bool] = []


class Conv1DRule(OpRule):
    name = "linear"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        m = c.module()
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None:
            return
        for d in range(x.ndim - 1):
            c.tie_dims(x, d, y, d)
        c.tie(y.space(-1), c.param(0, m.weight.shape[1]))
        c.tie(x.space(-1), c.param(1, m.weight.shape[0]))

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        keep_out, keep_in = r.kept_param(path, 0), r.kept_param(path, 1)
        slice_attr(m, "weight", 1, keep_out)
        slice_attr(m, "bias", 0, keep_out)
        slice_attr(m, "weight", 0, keep_in)
        m.nf = m.weight.shape[1]
        if hasattr(m, "nx"):
            m.nx = m.weight.shape[0]

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        m = gm.get_submodule(path)
        t = index_tensor(idx, m.weight.device)
        w = m.weight.detach()
        if axis == 1:
            return [("weight_in", w[t])]
        out = [("weight", w[:, t].t())]
        if m.bias is not None:
            out.append(("bias", m.bias.detach()[t].reshape(-1, 1)))
        return out

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        return math.prod(s.shape(node)) * s.axis(node.target, 1)

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        m = gm.get_submodule(path)
        out, inp = s.axis(path, 0), s.axis(path, 1)
        return out * inp + (out if m.bias is not None else 0)


def register() -> None:
    """Register the rule for the installed transformers' ``Conv1D`` (once; only if transformers is imported)."""
    if _DONE or "transformers" not in sys.modules:
        return
    _DONE.append(True)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # a transformers without it
        return
    register_op(Conv1D)(Conv1DRule)
