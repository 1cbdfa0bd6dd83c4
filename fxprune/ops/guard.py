"""The capture guards (``fxprune.nn.guard.check_input``, written by ``fxprune.capture``): they read input
metadata only, so they tie and freeze no channel."""
from __future__ import annotations

import torch.fx as fx

from ..ir.coupling import Coupling
from ..ir.space import Port
from ..nn.guard import check_input
from .registry import OpRule, register_op


@register_op(check_input)
class GuardRule(OpRule):
    """A shape/dtype check of a model input: no channel is read or produced."""

    name = "guard"

    def scope(self, node: fx.Node, c: Coupling) -> list[Port]:
        return []
