"""Replaying a plan: the channel shrink first, then each recorded graph rewrite in order.

Stages that rewrite the graph beyond channel slicing (``blocksparse``, ``patches``...) record what they did as a
JSON-able entry in ``Plan.rewrites`` (``{"pass": name, ...}``) and register the function that re-applies such an
entry with ``register_rewrite``. ``fxprune.load`` and the test oracles replay plans through ``apply_plan``, so a
saved model is rebuilt from the original architecture without pickle.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from ..errors import PlanError
from ..plan import Plan
from .shrink_channels import ShrinkChannels

log = logging.getLogger(__name__)

RewriteFn = Callable[[fx.GraphModule, dict, tuple], None]
_REWRITES: dict[str, RewriteFn] = {}


def register_rewrite(name: str) -> Callable[[RewriteFn], RewriteFn]:
    """Register ``fn(gm, entry, example_inputs)`` re-applying a ``Plan.rewrites`` entry whose ``"pass"`` is ``name``."""

    def deco(fn: RewriteFn) -> RewriteFn:
        _REWRITES[name] = fn
        return fn

    return deco


def apply_rewrite(gm: fx.GraphModule, entry: dict, example_inputs: Sequence[Any]) -> None:
    name = entry.get("pass")
    fn = _REWRITES.get(name)
    if fn is None:
        raise PlanError(f"plan rewrite {name!r} is unknown; registered: {', '.join(sorted(_REWRITES)) or 'none'}")
    fn(gm, entry, tuple(example_inputs))


def apply_plan(gm: fx.GraphModule, plan: Plan, example_inputs: Sequence[Any], analysis: Any = None) -> fx.GraphModule:
    """Apply ``plan`` to the traced, shape-recorded ``gm`` in place: shrink channels, then replay the rewrites."""
    inputs = tuple(example_inputs)
    if plan.kept:
        ShrinkChannels(plan, inputs, analysis)(gm)
    for entry in plan.rewrites:
        apply_rewrite(gm, entry, inputs)
    return gm


__all__ = ["register_rewrite", "apply_rewrite", "apply_plan"]
