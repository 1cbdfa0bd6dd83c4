"""The capture guards (``fxprune.capture.guards.check_input``): they read input metadata only, so they tie and
freeze no channel."""
from __future__ import annotations

import torch.fx as fx

from ..capture.guards import check_input
from ..graph.coupling import Coupling
from ..graph.space import Port
from .registry import OpRule, register_op


@register_op(check_input)
class GuardRule(OpRule):
    """A shape/dtype check of a model input: no channel is read or produced."""

    name = "guard"

    def scope(self, node: fx.Node, c: Coupling) -> list[Port]:
        return []
