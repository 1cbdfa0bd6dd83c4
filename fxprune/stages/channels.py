"""The ``channels`` stage: remove whole channels (filters, features, groups) and shrink every coupled layer.

``prune_channels`` is also the step loop of the ``heads`` and ``head_dim`` stages: analyse, score, plan the
budget's units, shrink, and repeat ``steps`` times, composing one plan in original indices.

Example:
    >>> recipe = {"stages": [{"kind": "channels", "target": {"flops": 0.5}, "criterion": "l2", "round_to": 8}]}
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..analysis import Analysis, analyze
from ..criteria import ScoreContext, get_criterion
from ..errors import RecipeError
from ..ir.space import Space
from ..passes.shrink_channels import ShrinkChannels
from ..plan import Plan
from ..planner import Budget, Planner, group_key
from ..recover import stage_begin, stage_finish
from .base import ChannelPruningStage, RecoveringStage, register_stage, validate_counts
from .latency_target import calibrate, corrected, graph_ratio, in_user_terms, latency_table, resolve_budget

log = logging.getLogger(__name__)


@register_stage("channels")
@dataclass
class ChannelStage(RecoveringStage):
    """Remove whole channels (filters, features, groups) and shrink every coupled layer.

    Fields:
        target: exactly one of ``{"sparsity": s}`` (fraction of each group's / all units removed),
            ``{"flops": f}`` (fraction of MACs removed), ``{"params": p}`` (fraction of parameters removed) or
            ``{"latency": l}`` (fraction of the latency measured on the example inputs removed: planned on a
            measured per-layer lookup table, then checked end to end; ``stages/latency_target.py``).
        criterion: name of a registered criterion (``l1``, ``l2``, ``bn_scale``, ``random``, ...).
        scope: ``local`` (same rate in every group), ``global`` (one ranking across groups, scores normalized
            by each group's mean) or ``module`` (one ranking and the same rate per module family, raw scores).
        modules: for ``scope: module``, family name -> glob patterns of module paths (e.g. ``{"mlp": ["*.fc1",
            "*.fc2"]}``); a group belongs to the first family naming a layer that produces its channels (else one
            that reads them). Groups in no family are not pruned.
        ignore: glob patterns of module paths whose channels must not change.
        round_to: kept units per group rounded up to a multiple of this (channel-aware for grouped convs); ``"auto"``:
            per group, where its measured latency curve steps (recorded in ``Plan.round_to``).
        steps: prune in this many equal steps, re-scoring in between.
        max_sparsity: at most this fraction of a group's units is removed.
        seed: seed of random criteria.
        layer_norm: ``freeze`` (default: LayerNorm-normalized dims never prune) or ``renormalize`` (they prune, and
            each pruned LayerNorm/RMSNorm normalizes over its kept channels only; this is how a ViT's embedding
            dim prunes, see ``fxprune/ops/norm_renormalize.py``). Written to JSON only when not the default.
        recover: training-free recovery after pruning, on the ``data`` batches: any of ``bn``, ``bias``,
            ``lstsq`` (they run as bias, lstsq, bn; ``fxprune.recover``). Written to JSON only when not empty.
    """

    scope: str = "local"
    modules: dict = field(default_factory=dict)
    steps: int = 1
    layer_norm: str = "freeze"

    def validate(self, path: str) -> None:
        self.validate_target(path)
        self.validate_criterion(path)
        if self.layer_norm not in ("freeze", "renormalize"):
            raise RecipeError(f"{path}.layer_norm", f"must be 'freeze' or 'renormalize', got {self.layer_norm!r}")
        if self.scope not in ("local", "global", "module"):
            raise RecipeError(f"{path}.scope", f"must be 'local' or 'global' (or 'module', with modules), "
                                               f"got {self.scope!r}")
        if not isinstance(self.modules, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and v and all(isinstance(p, str) for p in v)
                for k, v in self.modules.items()):
            raise RecipeError(f"{path}.modules", f"must map family names to non-empty lists of module-path patterns, "
                                                 f"got {self.modules!r}")
        if self.scope == "module" and not self.modules:
            raise RecipeError(f"{path}.modules", "scope 'module' needs at least one module family")
        self.validate_budget(path)
        validate_counts(self, path, ("steps",))

    def to_dict(self) -> dict[str, Any]:
        """As ``Stage.to_dict``; ``layer_norm`` only when not the default ``freeze`` (recipes written before the
        field existed keep their exact form)."""
        out = super().to_dict()
        if out.get("layer_norm") == "freeze":
            del out["layer_norm"]
        return out

    def budget(self) -> Budget:
        return dataclasses.replace(super().budget(), scope=self.scope, modules=dict(self.modules))

    def analysis_options(self) -> dict[str, str]:
        """Options for ``analyze`` (and recorded in the plan): empty unless ``layer_norm`` is not the default."""
        return {"layer_norm": self.layer_norm} if self.layer_norm != "freeze" else {}

    def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
        return prune_channels(gm, self, ctx, self.budget(), steps=self.steps, options=self.analysis_options())


def _removed_before(a: Analysis, plan: Plan) -> dict[int, int]:
    """Per group of ``a``, how many units earlier steps (``plan``) removed, from a parameter axis' shrinkage."""
    done: dict[int, int] = {}
    for key, kept in plan.kept.items():
        space = Space.parse(key)
        i = a.index.get(space)
        if i is None or not space.is_param:
            continue
        g = int(a.space_group[i])
        n_units = int((a.unit_group == g).sum())
        done.setdefault(g, round(n_units * plan.sizes[key] / len(kept)) - n_units)
    return done


def prune_channels(gm: fx.GraphModule, stage: ChannelPruningStage, ctx: ScoreContext, budget: Budget, *, steps: int,
                   options: Mapping[str, str], groups: Callable[[Analysis], Collection[int]] | None = None) -> Plan:
    """Prune ``gm`` in ``steps`` steps to ``stage.target``; returns the composed plan (original indices).

    When the stage has ``recover`` (``fxprune.recover``), the pruned graph is repaired after the last step against a
    copy of ``gm`` from before the first.

    Args:
        stage: the target, criterion, ignore patterns and seed (a ``channels``, ``heads`` or ``head_dim`` stage).
        budget: how the planner ranks units and how far it may go.
        steps: prune in this many equal steps, re-scoring in between.
        options: analysis options, recorded in each step's plan (e.g. ``{"layer_norm": "renormalize"}``).
        groups: which groups of an analysis may lose units (e.g. the attention-head groups); default all.
    """
    ctx = dataclasses.replace(ctx, seed=stage.seed)
    options = {**ctx.analysis_options, **options}
    inputs = ctx.example_inputs
    criterion = get_criterion(stage.criterion)
    dense = stage_begin(gm, stage, ctx)  # a copy before pruning when the stage has ``recover``
    plan = Plan()
    base: dict[str, float] = {}
    kind = stage.target_kind
    removing, reference, first_ms = stage.target_value, 1.0, 0.0  # latency: in the traced graph's terms
    for step in range(1, steps + 1):
        a = analyze(gm, stage.ignore, options)
        table = None
        if kind == "latency" or (stage.round_to == "auto" and step == 1):
            table = latency_table(a, budget)
        wanted = groups(a) if groups is not None else None
        if step == 1:
            budget = resolve_budget(a, budget, stage.round_to, table, wanted)
        planner = Planner(a, criterion.score(a, ctx), budget, _removed_before(a, plan),
                          normalize=not getattr(criterion, "comparable_across_groups", False),
                          groups=wanted, latency=table)
        if groups is not None and not planner.orders:
            log.warning("%s stage: nothing of this kind is prunable in this model", stage.kind)
        if kind == "latency":
            measured = calibrate(gm, planner, stage.target_value / steps, inputs, ctx.reference if step == 1 else None)
            if step == 1:
                reference = measured
                removing = 1.0 - graph_ratio(1.0 - stage.target_value, reference, ctx.output)
        base = base or {"macs": planner.counter.base_macs, "params": planner.counter.total_params,
                        "latency": table.base_ms if table is not None and kind == "latency" else 0.0}
        goal = removing * step / steps
        stats: dict[str, float] = {}
        if kind == "latency":
            assert table is not None
            rel = max(0.0, 1 - (1 - goal) * base["latency"] / table.base_ms) if table.base_ms else 0.0
            removed, stats = corrected(gm, planner, rel, inputs)
            first_ms = first_ms or stats["latency_base_ms"]
        elif kind == "sparsity" and budget.scope == "local":
            rel = goal  # local fractions count the units earlier steps removed
        elif kind == "sparsity":
            done = stage.target_value * (step - 1) / steps
            rel = 1 - (1 - goal) / (1 - done)
        else:
            metric = "macs" if kind == "flops" else "params"
            now = planner.counter.base_macs if metric == "macs" else planner.counter.total_params
            rel = max(0.0, 1 - (1 - goal) * base[metric] / now) if now else 0.0
        if kind != "latency":
            removed = planner.solve(kind, rel)
        step_plan = planner.plan(removed)
        step_plan.stats = {**planner.counter.count(planner.new_sizes(removed)), "step": step, **stats}
        step_plan.options = dict(options)
        if stage.round_to == "auto":
            step_plan.round_to = {group_key(a, o.group): int(budget.group_round_to.get(group_key(a, o.group), 1))
                                  for o in planner.orders}
        log.info("stage %s step %d/%d: %d units removed", stage.kind, step, steps, len(removed))
        ShrinkChannels(step_plan, inputs, a)(gm)
        plan = plan.compose(step_plan)
    if kind == "latency":  # the stats as ratios to the model as the user gets it
        plan.stats = in_user_terms(plan.stats, first_ms, 1.0 - stage.target_value, reference, ctx.output)
    stage_finish(dense, gm, plan, stage, ctx)
    return plan


__all__ = ["ChannelStage", "prune_channels"]
