"""``fxprune.compile``: trace → analyze → score → plan → shrink, stage by stage, on a copy of the model."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.fx as fx
from torch import nn

from .criteria import ScoreContext, get_criterion
from .errors import ExampleInputsError, FxPruneError
from .graph.dependency import analyze
from .graph.space import Space
from .passes.shrink_channels import ShrinkChannels
from .plan import Plan
from .planner import Planner
from .recipe import ChannelStage, Recipe
from .trace import record_shapes, spec_of, trace, unwrap

log = logging.getLogger(__name__)
_STAGE_RUNNERS: dict[type, Callable[..., Plan]] = {}


def stage_runner(stage_cls: type) -> Callable:
    """Register the function that applies one kind of stage: ``fn(gm, stage, ctx) -> Plan``."""

    def deco(fn: Callable) -> Callable:
        _STAGE_RUNNERS[stage_cls] = fn
        return fn

    return deco


def as_input_tuple(example_inputs: Any) -> tuple:
    """``example_inputs`` as a tuple: a tensor becomes a 1-tuple; anything else must be a tuple or list."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ExampleInputsError(f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def unwrap_model(model: Any) -> nn.Module:
    """The plain ``nn.Module`` inside a ``torch.compile`` or ``DataParallel`` / ``DistributedDataParallel`` wrapper
    (with a warning: the pruned result is not wrapped again); TorchScript and non-modules are refused."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"model is a TorchScript module ({type(model).__name__}); fxprune traces Python code with "
                        "torch.fx: pass the nn.Module from before torch.jit.script / torch.jit.trace")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner, wrappers = unwrap(model)
    if wrappers:
        log.warning("pruning the %s inside %s; the pruned model is a plain GraphModule (wrap it again if needed)",
                    type(inner).__name__, " inside ".join(wrappers))
    return inner


def _check_model(model: Any) -> None:
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise FxPruneError(f"parameter '{meta[0]}' is on the meta device: load real weights before pruning (criteria read weights)")
    bad = [n for n, p in model.named_parameters() if p.numel() and not torch.isfinite(p.detach().sum()) and not torch.isfinite(p).all()]
    if bad:
        raise FxPruneError(f"parameter '{bad[0]}' holds NaN or Inf values: criteria cannot rank channels of a broken model")


def _removed_before(a, plan: Plan) -> dict[int, int]:
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


@stage_runner(ChannelStage)
def run_channel_stage(gm: fx.GraphModule, stage: ChannelStage, ctx: ScoreContext, inputs: tuple,
                      planner_cls: type[Planner] = Planner) -> Plan:
    """Prune channels in ``stage.steps`` steps; returns the composed plan (original indices).

    ``planner_cls`` picks the groups and units (e.g. ``heads.HeadPlanner`` plans attention heads only).
    """
    from .recover import stage_begin, stage_finish

    criterion = get_criterion(stage.criterion)
    dense = stage_begin(gm, stage, ctx)  # a copy before pruning when the stage has ``recover``
    plan = Plan()
    base = None
    for step in range(1, stage.steps + 1):
        options = getattr(stage, "analysis_options", {})
        a = analyze(gm, stage.ignore, options)
        planner = planner_cls(a, criterion.score(a, ctx), stage, _removed_before(a, plan),
                          normalize=not getattr(criterion, "comparable_across_groups", False))
        if base is None:
            base = {"macs": planner.counter.base_macs, "params": planner.counter.total_params}
        goal = stage.target_value * step / stage.steps
        kind = stage.target_kind
        if kind == "sparsity" and stage.scope == "local":
            rel = goal  # local fractions count the units earlier steps removed
        elif kind == "sparsity":
            done = stage.target_value * (step - 1) / stage.steps
            rel = 1 - (1 - goal) / (1 - done)
        else:
            metric = "macs" if kind == "flops" else "params"
            now = planner.counter.base_macs if metric == "macs" else planner.counter.total_params
            rel = max(0.0, 1 - (1 - goal) * base[metric] / now) if now else 0.0
        removed = planner.solve(kind, rel)
        step_plan = planner.plan(removed)
        step_plan.stats = {**planner.counter.count(planner.new_sizes(removed)), "step": step}
        step_plan.options = dict(options)
        log.info("stage %s step %d/%d: %d units removed", stage.kind, step, stage.steps, len(removed))
        ShrinkChannels(step_plan, inputs, a)(gm)
        plan = plan.compose(step_plan)
    stage_finish(dense, gm, plan, stage, ctx)
    return plan


def compile(  # noqa: A001  (the name users expect)
    model: nn.Module,
    recipe: Union[Recipe, dict, str, Path],
    *,
    example_inputs: Any,
    data: Any = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    finetune: Callable[[nn.Module, int], None] | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Prune ``model`` as ``recipe`` says and return a new, physically smaller ``GraphModule``.

    The input model is never modified. The result carries its plan as ``result.fxprune_plan`` and its recipe as
    ``result.fxprune_recipe``.

    Args:
        model: any traceable ``nn.Module`` (in train or eval mode; the result has the same mode). A ``torch.compile``
            or ``DataParallel`` wrapper is looked through (with a warning); TorchScript modules are refused.
        recipe: a ``Recipe``, a dict, a path to a YAML/JSON recipe file, or YAML/JSON text.
        example_inputs: a tensor or tuple of tensors the model accepts (small shapes are fine).
        data: calibration data for data-driven criteria (ignored by ``l1``/``l2``/``bn_scale``/``random``).
        evaluate: ``evaluate(model) -> float`` (higher is better), for sensitivity-driven stages.
        finetune: ``finetune(model, step)``, called after each pruning step of iterative stages.
        backend: if given (e.g. ``"inductor"``), return ``torch.compile(pruned, backend=backend, fullgraph=True)``.

    Returns:
        A ``torch.fx.GraphModule`` whose output shapes equal the model's (compiled when ``backend`` is set). With a
        recipe ``submodule`` (partial tracing, ``fxprune.partial``): the whole model, an ``nn.Module``, in which only
        that submodule was replaced by its pruned ``GraphModule``.

    Example:
        >>> pruned = fxprune.compile(torchvision.models.resnet18(), {"stages": [{"target": {"flops": 0.5}}]},
        ...                          example_inputs=torch.randn(1, 3, 64, 64))
    """
    recipe = Recipe.load(recipe)
    model = unwrap_model(model)
    _check_model(model)
    inputs = as_input_tuple(example_inputs)
    if recipe.submodule:  # partial tracing: prune one traceable submodule, return the whole model
        from .partial import compile_submodule

        return compile_submodule(model, recipe, inputs, data=data, evaluate=evaluate, finetune=finetune,
                                 backend=backend)
    gm = prune_graph(copy.deepcopy(model).eval(), recipe, inputs, data=data, evaluate=evaluate, finetune=finetune)
    gm.train(model.training)
    if backend is not None:
        compiled = torch.compile(gm, backend=backend, fullgraph=True)
        compiled.fxprune_plan, compiled.fxprune_recipe = gm.fxprune_plan, recipe
        return compiled
    return gm


def prune_graph(module: nn.Module, recipe: Recipe, inputs: tuple, *, data: Any = None,
                evaluate: Callable[[nn.Module], float] | None = None,
                finetune: Callable[[nn.Module, int], None] | None = None) -> fx.GraphModule:
    """Trace ``module`` (a private copy, in eval mode: its submodules end up in the result) and run every stage of
    ``recipe`` on it with ``inputs``; returns the shrunk ``GraphModule`` carrying ``fxprune_plan``/``fxprune_recipe``.

    Raises ``FxPruneError`` if the output shapes changed (outputs are frozen, so they never should).
    """
    gm = trace(module, recipe.leaf_modules)
    record_shapes(gm, inputs)
    before = output_spec(gm)
    plan = Plan()
    for i, stage in enumerate(recipe.stages):
        runner = _STAGE_RUNNERS.get(type(stage))
        if runner is None:
            raise FxPruneError(f"stage kind '{stage.kind}' (stages[{i}]) is not implemented")
        ctx = ScoreContext(seed=getattr(stage, "seed", 0), data=data, example_inputs=inputs, evaluate=evaluate,
                           finetune=finetune, options={"stage": f"stages[{i}]"})
        plan = plan.compose(runner(gm, stage, ctx, inputs))
    after = output_spec(gm)
    if before != after:
        raise FxPruneError(f"internal error: output shapes changed from {before} to {after}")
    gm.fxprune_plan = plan
    gm.fxprune_recipe = recipe
    return gm


def output_spec(gm: fx.GraphModule) -> Any:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [spec_of(a) for a in out.all_input_nodes]


__all__ = ["compile", "prune_graph", "stage_runner", "run_channel_stage"]
