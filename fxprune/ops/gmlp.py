"""gMLP's spatial gating unit (timm ``SpatialGatingUnit``, ``fxprune.nn.PrunedSpatialGatingUnit``), a leaf.

Its input channels are ``[u | v]`` and output channel ``i`` is ``u_i`` gated by ``v_i`` (``v`` normalized over
its channels, then mixed along the tokens). The rule ties input channel ``i`` of the ``u`` half to output channel
``i`` through a parameter axis (0: the gated channels), so the MLP hidden dims around the gate (``fc1``'s first
half, ``fc2``'s columns) prune. The ``v`` half and the token dim stay: ``v``'s norm spans all of its channels and
the token projection has a fixed sequence length. Shrinking swaps in ``PrunedSpatialGatingUnit``, which gates the
kept ``u`` channels with their own ``v`` channels, so it equals the original with the removed channels zeroed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx, nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import Space
from ..nn.gating import PrunedSpatialGatingUnit
from .registry import OpRule, register_installed, register_op
from .tensor_attr import resolve


def u_dim(m: nn.Module, channels: int) -> int:
    """Channels of the ``u`` half of an input with ``channels`` channels."""
    return m.u_dim if isinstance(m, PrunedSpatialGatingUnit) else channels // 2


class SpatialGatingRule(OpRule):
    name = "spatial_gating"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None or x.ndim < 2 or node.kwargs:
            return
        n = u_dim(c.module(), x.shape[-1])
        if y.shape[-1] != n:
            return
        for d in range(x.ndim - 2):  # leading (batch) dims pass through
            c.tie_dims(x, d, y, d)
        gate = c.param(0, n)
        c.tie(x.space(-1), gate, np.arange(n), np.arange(n))
        c.tie(y.space(-1), gate)

    def frozen_reason(self, node: fx.Node, space: Space) -> str:
        return (f"spatial gating unit {node.target}: the gate half v is normalized over all its channels and mixed "
                f"along the tokens, so v's channels and the token dim stay (dim {space.dim} of '{space.owner}')")

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        kept = r.kept_param(path, 0)
        if kept is None:
            return
        m = gm.get_submodule(path)
        norm, proj = m.get_submodule("norm"), m.get_submodule("proj")
        t = torch.as_tensor(np.asarray(kept), dtype=torch.long, device=next(proj.parameters()).device)
        gate = m.gate_index[t] if isinstance(m, PrunedSpatialGatingUnit) else t
        owner, name = resolve(gm, path)
        setattr(owner, name, PrunedSpatialGatingUnit(norm, proj, gate))

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        """The token projection: one ``tokens x tokens`` Linear per gated channel."""
        out = s.shape(node)
        return math.prod(out) * out[-2]

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        return 0  # the norm and the projection own every parameter and keep their sizes


register_op(PrunedSpatialGatingUnit)(SpatialGatingRule)


def register() -> None:
    """Register the rule for timm's ``SpatialGatingUnit`` (once; only if timm is imported)."""
    register_installed("timm.models.mlp_mixer", ["SpatialGatingUnit"], SpatialGatingRule)
