"""The ``iterative`` stage: sensitivity analysis and iterative group selection with fine-tuning in between.

Source: Pavlitska et al., "Iterative Filter Pruning for Concatenation-based CNN Architectures", arXiv 2405.03715
(code: fzi-forschungszentrum-informatik/iterative-yolo-pruning). Each step prunes every layer *alone* at a few
rates (25/50/75%), evaluates the model, scores ``saving(l, r) * metric(l, r) ** alpha`` (alpha = 20, lowered by
about 1 per iteration), picks the best rate per layer, prunes the top layers, fine-tunes and repeats.

Our reading (not fixed by the paper):
- A "layer" is a coupling *group* (a set of channels that must shrink together), so concatenations, residual
  sums and shared producers are handled by the analysis instead of a hand-built connectivity graph.
- Inside a group, channels go in the order of the stage's criterion (the paper: smallest L2 norm).
- One saving (``flops`` = MACs, or ``params``) per stage, instead of mixing params and FLOPs picks; the saving
  is the fraction of the current model's count a candidate removes.
- The step that reaches the target trims its last group's rate to land on it; if ``steps`` run out first, a
  warning is logged and the plan so far is returned (its ``stats["target_met"]`` is 0).
- ``evaluate(model) -> float`` must be higher-is-better and non-negative (e.g. accuracy in [0, 1]); negative
  values count as 0. It is called on pruned *copies*; ``finetune(model, step)`` trains the model in place.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch.fx as fx
from tqdm.auto import tqdm

from .. import distributed
from ..analysis import Analysis, analyze
from ..criteria import ScoreContext, get_criterion
from ..errors import FxPruneError, RecipeError
from ..latency import model_ratios
from ..passes.shrink_channels import ShrinkChannels
from ..plan import Plan
from ..planner import Planner, group_key
from ..recover import stage_begin, stage_finish
from .base import RecoveringStage, is_number, register_stage, validate_counts
from .latency_target import calibrate, graph_ratio, latency_table, resolve_budget, user_ratio

log = logging.getLogger(__name__)


@register_stage("iterative")
@dataclass
class IterativeStage(RecoveringStage):
    """Prune the most profitable groups step by step, measured by ``evaluate``, fine-tuning after each step.

    Fields:
        target: ``{"flops": f}``, ``{"params": p}`` or ``{"latency": l}``: the fraction of MACs / parameters /
            measured latency to remove in all (latency: savings and progress are the per-layer lookup table's
            predictions, calibrated end to end each step; the final plan's measured ratio is in its stats).
        criterion: orders the channels inside a group (``l2`` as in the paper; any registered criterion).
        rates: fractions of a group's prunable units tried in the sensitivity sweep.
        alpha: exponent of the metric in ``saving * metric ** alpha``; ``alpha_decay`` is subtracted each step.
        layers_per_step: groups pruned per step (the best-scoring ones).
        steps: at most this many steps.
        ignore, round_to, max_sparsity, seed: as in the ``channels`` stage.
        recover: recovery after each step's pruning, before ``finetune`` (``fxprune.recover``).
    """

    target: dict = field(default_factory=lambda: {"flops": 0.5})
    rates: list = field(default_factory=lambda: [0.25, 0.5, 0.75])
    alpha: float = 20.0
    alpha_decay: float = 1.0
    layers_per_step: int = 5
    steps: int = 14
    TARGETS: ClassVar[tuple[str, ...]] = ("flops", "params", "latency")

    def validate(self, path: str) -> None:
        self.validate_target(path)
        self.validate_criterion(path)
        rates = self.rates
        if not isinstance(rates, list) or not rates or not all(is_number(r) and 0 < r < 1 for r in rates):
            raise RecipeError(f"{path}.rates", f"must be a non-empty list of fractions in (0, 1), got {rates!r}")
        for name, v in (("alpha", self.alpha), ("alpha_decay", self.alpha_decay)):
            if not is_number(v) or v < 0:
                raise RecipeError(f"{path}.{name}", f"must be a number >= 0, got {v!r}")
        self.validate_budget(path)
        validate_counts(self, path, ("layers_per_step", "steps"))

    @property
    def metric(self) -> str:
        return {"flops": "macs", "params": "params"}.get(self.target_kind, self.target_kind)

    def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
        return run_iterative_stage(gm, self, ctx)


def _replay(gm: fx.GraphModule, plan: Plan, inputs: tuple, analysis: Analysis) -> fx.GraphModule:
    pruned = copy.deepcopy(gm)
    ShrinkChannels(plan, inputs, analysis)(pruned)
    return pruned.eval()


def _sweep(planner: Planner, gm: fx.GraphModule, stage: IterativeStage, ctx: ScoreContext, inputs: tuple,
           alpha: float, step: int) -> list[tuple[float, int, np.ndarray]]:
    """Per group, the best ``(score, group index, removed units)`` over the rates, best group first.

    Under ``torch.distributed`` the evaluations are split across ranks (candidate ``j`` on rank ``j % world``)
    and gathered, so ``evaluate`` must return the same value on every rank (e.g. a full validation set)."""
    candidates: list[tuple[int, float, np.ndarray]] = []  # (group index, rate, removed units)
    for i, o in enumerate(planner.orders):
        for rate in stage.rates:
            removed = planner.prefix(o, int(math.floor(rate * o.n_prunable + 1e-9)))
            if len(removed):
                candidates.append((i, rate, removed))
    mine = list(range(distributed.rank(), len(candidates), distributed.world_size()))
    metrics: dict[int, float] = {}
    for j in tqdm(mine, desc=f"fxprune iterative step {step}", leave=False,
                  disable=not mine or not distributed.is_main()):
        metrics[j] = float(ctx.evaluate(_replay(gm, planner.plan(candidates[j][2]), inputs, planner.a)))
    for part in distributed.all_gather_objects(metrics):
        metrics.update(part)
    best: dict[int, tuple[float, int, np.ndarray]] = {}
    for j, (i, rate, removed) in enumerate(candidates):
        saving = planner.reduction(removed, stage.metric)
        score = saving * max(metrics[j], 0.0) ** alpha
        log.debug("step %d group %d rate %.2f: saving %.4f metric %.4f score %.3g", step, planner.orders[i].group,
                  rate, saving, metrics[j], score)
        if i not in best or score > best[i][0]:
            best[i] = (score, i, removed)
    return sorted(best.values(), key=lambda t: (-t[0], t[1]))


def _select(planner: Planner, ranked: list, stage: IterativeStage, need: float) -> np.ndarray:
    """Union of the top groups' removals; the group that reaches ``need`` is trimmed to just reach it."""
    parts: list[np.ndarray] = []
    for _, i, removed in ranked[:stage.layers_per_step]:
        trial = np.concatenate(parts + [removed])
        if planner.reduction(trial, stage.metric) < need:
            parts.append(removed)
            continue
        lo, hi = 1, len(removed)  # smallest prefix of this group's removal that reaches the target
        while lo < hi:
            mid = (lo + hi) // 2
            if planner.reduction(np.concatenate(parts + [removed[:mid]]), stage.metric) >= need:
                hi = mid
            else:
                lo = mid + 1
        trimmed = planner.prefix(planner.orders[i], lo)  # round_to may round the kept count up
        parts.append(trimmed if len(trimmed) else removed)
        break
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def run_iterative_stage(gm: fx.GraphModule, stage: IterativeStage, ctx: ScoreContext) -> Plan:
    """Run the sensitivity sweep and prune step by step until the target; returns the composed plan."""
    if ctx.evaluate is None:
        raise FxPruneError("stage 'iterative' needs evaluate: pass fxprune.compile(..., evaluate=fn) with "
                           "fn(model) -> float, higher is better (e.g. validation accuracy)")
    if stage.recover and ctx.data is None:
        stage_begin(gm, stage, ctx)  # raises the "needs data" error before any evaluation runs
    ctx = dataclasses.replace(ctx, seed=stage.seed)
    inputs = ctx.example_inputs
    criterion = get_criterion(stage.criterion)
    budget = stage.budget()
    plan, base, alpha, met = Plan(), None, float(stage.alpha), False
    keep, reference = 1 - stage.target_value, 1.0  # the part of the metric to keep; the graph's time over the model's
    dense_gm = copy.deepcopy(gm) if stage.metric == "latency" else None
    for step in range(1, stage.steps + 1):
        a = analyze(gm, stage.ignore, ctx.analysis_options)
        table = None
        if stage.metric == "latency" or (stage.round_to == "auto" and step == 1):
            table = latency_table(a, budget)
        if step == 1:
            budget = resolve_budget(a, budget, stage.round_to, table, None)
        planner = Planner(a, criterion.score(a, ctx), budget, latency=table)
        if stage.metric == "latency":
            measured = calibrate(gm, planner, stage.target_value / stage.steps, inputs,
                                 ctx.reference if step == 1 else None)
            if step == 1:  # the request about the user's model, in the traced graph's terms
                reference, keep = measured, graph_ratio(1 - stage.target_value, measured, ctx.output)
        now = _amount(planner, stage.metric, {})
        base = base if base is not None else now
        need = 1 - keep * base / now if now else 0.0
        if need <= 1e-12:
            met = True
            break
        ranked = _sweep(planner, gm, stage, ctx, inputs, alpha, step)
        removed = _select(planner, ranked, stage, need)
        if len(removed) == 0:
            log.warning("iterative: step %d found nothing left to prune", step)
            break
        step_plan = planner.plan(removed)
        counts = {**planner.counter.count(planner.new_sizes(removed)),
                  stage.metric: _amount(planner, stage.metric, planner.new_sizes(removed))}
        step_plan.stats = {**counts, "step": step}
        if stage.round_to == "auto":
            step_plan.round_to = {group_key(a, o.group): int(budget.group_round_to.get(group_key(a, o.group), 1))
                                  for o in planner.orders}
        step_plan.options = dict(ctx.analysis_options)
        dense = stage_begin(gm, stage, ctx)  # the step's dense reference when the stage has ``recover``
        ShrinkChannels(step_plan, inputs, a)(gm)
        stage_finish(dense, gm, step_plan, stage, ctx)
        plan = plan.compose(step_plan)
        log.info("iterative step %d: %d groups, %d units removed, %s %.4f of the original left (alpha %.1f)", step,
                 len({int(g) for g in a.unit_group[removed]}), len(removed), stage.metric,
                 counts[stage.metric] / base, alpha)
        if ctx.finetune is not None:
            ctx.finetune(gm, step)
        gm.eval()
        alpha = max(0.0, alpha - stage.alpha_decay)
        if counts[stage.metric] <= keep * base * (1 + 1e-12):
            met = True
            break
    if not met:
        log.warning("iterative: target %s %.3f not met after %d steps", stage.target_kind, stage.target_value,
                    stage.steps)
    plan.stats = {**plan.stats, "target_met": int(met)}
    if dense_gm is not None:  # what the lookup table's plan measures end to end
        (dense_ms, _), (_, graph) = model_ratios([dense_gm, gm], inputs)
        plan.stats = {**plan.stats, "latency_base_ms": dense_ms, "latency_measured_ms": graph * dense_ms,
                      "latency_graph_ratio": graph, "latency_reference_ratio": reference,
                      "latency_measured_ratio": user_ratio(graph, reference, ctx.output),
                      "latency_requested_ratio": 1 - stage.target_value}
    return plan


def _amount(planner: Planner, metric: str, new_sizes: dict) -> float:
    """MACs, parameters or predicted milliseconds of the planner's graph at ``new_sizes``."""
    if metric == "latency":
        assert planner.latency is not None
        return planner.latency.predict(new_sizes)
    return planner.counter.count(new_sizes)[metric]


__all__ = ["IterativeStage", "run_iterative_stage"]
