"""Graph inputs, outputs and tensor attributes (``get_attr``)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from .registry import OpRule, register_op
from .tensor_attr import index_tensor, resolve, slice_attr


@register_op(fx_op="placeholder")
class InputRule(OpRule):
    """Model inputs keep their shape: every slot is frozen."""

    name = "input"

    def frozen_reason(self, node: fx.Node, space: object) -> str:
        return f"model input '{node.target}'"


@register_op(fx_op="output")
class OutputRule(OpRule):
    """What feeds the model's output is never shrunk."""

    name = "output"

    def frozen_reason(self, node: fx.Node, space: object) -> str:
        return "model output"


def _fetch(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner, name = resolve(gm, path)
    return getattr(owner, name)


_METADATA = ("dtype", "device", "is_cuda")


def metadata_only(node: fx.Node) -> bool:
    """Whether a ``get_attr`` tensor is only asked for its dtype/device (EdgeNeXt reads ``proj.weight.device``
    while calling ``proj``): it is not a second owner of those parameters, and its shape follows its module's."""
    return bool(node.users) and all(
        u.op == "call_function" and u.target is getattr and u.args[1] in _METADATA for u in node.users)


@register_op(fx_op="get_attr")
class AttributeRule(OpRule):
    """A tensor attribute used in the graph (e.g. a layer scale or a position embedding): any dim may shrink."""

    name = "attribute"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        y = c.out()
        if y is None:
            return
        if metadata_only(node):  # ``w.dtype``/``w.device``/``w.shape``: nothing to couple, nothing to slice here
            return
        for d, n in enumerate(y.shape):
            c.tie(y.space(d), c.param(d, n))

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        owner, name = resolve(gm, path)
        for d in range(_fetch(gm, path).dim()):
            slice_attr(owner, name, d, r.kept_param(path, d))

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        t = _fetch(gm, path).detach()
        return [("attr", t.index_select(axis, index_tensor(idx, t.device)).movedim(axis, 0).reshape(len(idx), -1))]

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        t = _fetch(gm, path)
        if not isinstance(t, torch.nn.Parameter):
            return 0
        return math.prod(s.axis(path, d) for d in range(t.dim()))
