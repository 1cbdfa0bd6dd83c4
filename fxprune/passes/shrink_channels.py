"""``ShrinkChannels``: apply a ``Plan`` to a traced module by physically slicing parameters and rewriting
graph constants. It never decides anything: what to keep comes from the plan.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..analysis import Analysis, analyze
from ..errors import ExampleInputsError, PlanError, RewriteError
from ..ir.context import RewriteContext
from ..ir.space import Space
from ..ir.spec import TensorSpec, spec_of
from ..ops.io import metadata_only
from ..plan import Plan
from ..trace import record_shapes

log = logging.getLogger(__name__)


def check_plan(plan: Plan, analysis: Analysis) -> None:
    """Raise ``PlanError`` unless the plan removes whole, unfrozen units of this graph and keeps a slot per space."""
    removed_slots = []
    for key, idx in plan.kept.items():
        space = Space.parse(key)
        if space not in analysis.index:
            raise PlanError(f"plan names space '{key}', which this graph does not have")
        i = analysis.index[space]
        n = int(analysis.sizes[i])
        if plan.sizes.get(key, n) != n:
            raise PlanError(f"plan expects '{key}' of size {plan.sizes[key]}, the graph has {n}")
        kept = np.asarray(idx, np.int64)
        if len(kept) == 0 or np.any(np.diff(kept) <= 0) or kept[0] < 0 or kept[-1] >= n:
            raise PlanError(f"kept indices of '{key}' must be sorted, unique, non-empty and within [0, {n})")
        removed_slots.append(analysis.offsets[i] + np.setdiff1d(np.arange(n), kept))
    if not removed_slots:
        return
    slots = np.concatenate(removed_slots)
    units = np.unique(analysis.slot_unit[slots])
    if analysis.unit_frozen[units].any():
        raise PlanError("plan removes channels that are frozen in this graph")
    full = np.isin(analysis.slot_unit, units).sum()
    if full != len(slots):
        raise PlanError("plan removes only part of a coupled unit: coupled channels must be removed together")


class ShrinkChannels(PassBase):
    """Slice parameters, buffers and module attributes, and rewrite node arguments, as ``plan`` says.

    Args:
        plan: what to keep (indices of the graph this pass runs on).
        example_inputs: used by ``ensures`` to re-record shapes and check them against the plan.
        analysis: the coupling analysis of the graph, if already computed (for ``requires``).
    """

    def __init__(self, plan: Plan, example_inputs: Sequence[Any], analysis: Analysis | None = None) -> None:
        self.plan = plan
        self.example_inputs = tuple(example_inputs)
        self.analysis = analysis
        self.ctx: RewriteContext | None = None

    def requires(self, gm: fx.GraphModule) -> None:
        if self.analysis is None:
            self.analysis = analyze(gm, options=self.plan.options)
        check_plan(self.plan, self.analysis)

    def call(self, gm: fx.GraphModule) -> PassResult:
        a = self.analysis
        self.ctx = r = RewriteContext(self.plan.kept_spaces(), a.param_sizes)
        if not self.plan.kept:
            return PassResult(gm, False)
        owners = sorted({s.owner for s in r.kept_indices if s.is_param})
        for owner in owners:
            a.param_rules[owner].shrink_module(gm, owner[1:], r)
        for node in list(gm.graph.nodes):
            if r.touches(node) or any(r.touches(i) for i in node.all_input_nodes):
                rule = a.node_rules[node.name]
                try:
                    rule.rewrite_node(node, r)
                except Exception as exc:
                    raise RewriteError(f"rule '{rule.name}' could not rewrite {node.format_node()}: {exc}") from exc
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        if self.ctx is None or not self.plan.kept:
            return
        expected = {}
        for node in gm.graph.nodes:
            spec = spec_of(node)
            items = spec if isinstance(spec, tuple) else (spec,)
            expected[node.name] = [self.ctx.shape(node, i) if isinstance(s, TensorSpec) else None
                                   for i, s in enumerate(items)]
        try:
            record_shapes(gm, self.example_inputs)
        except ExampleInputsError as exc:  # the inputs ran before the rewrite: this is a rewrite bug
            raise RewriteError(f"the shrunk graph no longer runs (please report this with the model): {exc}") from exc
        for node in gm.graph.nodes:
            spec = spec_of(node)
            items = spec if isinstance(spec, tuple) else (spec,)
            got = [tuple(s.shape) if isinstance(s, TensorSpec) else None for s in items]
            want = expected.get(node.name)
            if node.op == "get_attr" and metadata_only(node):
                continue  # its shape follows the module that owns it
            if want is not None and any(w is not None and w != g for w, g in zip(want, got)):
                raise RewriteError(f"after shrinking, {node.format_node()} has shape {got}, the plan predicts {want}")
