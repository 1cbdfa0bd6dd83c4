"""``fxprune.compile``: trace → analyze → score → plan → shrink, stage by stage, on a copy of the model."""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from . import stages  # noqa: F401  (every stage kind registers itself on import)
from .capture.leaves import capture_lines
from .copies import shared_copy, unshare
from .criteria import ScoreContext
from .errors import FxPruneError, ModuleModeError
from .inputs import as_input_tuple, call_with, input_specs
from .ir.spec import spec_of
from .passes.graph_diff import snapshot
from .passes.hf_config import hf_layout
from .passes.write_back import MODULE_OPTIONS, TRACED, to_module
from .plan import Plan
from .recipe import Recipe
from .submodule import SubmoduleScope
from .trace import record_shapes, trace, unwrap

log = logging.getLogger(__name__)

#: what ``compile`` returns: the pruned graph, or the model's own class shrunk in place
OUTPUTS = ("graph", "module")


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
        raise FxPruneError(f"parameter '{meta[0]}' is on the meta device: load real weights before pruning "
                           f"(criteria read weights)")
    bad = [n for n, p in model.named_parameters()
           if p.numel() and not torch.isfinite(p.detach().sum()) and not torch.isfinite(p).all()]
    if bad:
        raise FxPruneError(f"parameter '{bad[0]}' holds NaN or Inf values: criteria cannot rank channels of a "
                           f"broken model")


def compile(
    model: nn.Module,
    recipe: Recipe | dict | str | Path,
    *,
    example_inputs: Any,
    data: Any = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    finetune: Callable[[nn.Module, int], None] | None = None,
    backend: str | None = None,
    output: str = "graph",
) -> nn.Module:
    """Prune ``model`` as ``recipe`` says and return a new, physically smaller ``GraphModule`` (or, with
    ``output="module"``, a copy of the model itself, of its own class, shrunk in place).

    The input model is never modified. The result carries its plan as ``result.fxprune_plan`` and its recipe as
    ``result.fxprune_recipe``.

    Args:
        model: any traceable ``nn.Module`` (in train or eval mode; the result has the same mode). A ``torch.compile``
            or ``DataParallel`` wrapper is looked through (with a warning); TorchScript modules are refused.
        recipe: a ``Recipe``, a dict, a path to a YAML/JSON recipe file, or YAML/JSON text.
        example_inputs: a tensor or tuple of tensors the model accepts (small shapes are fine), or a dict of keyword
            inputs (``{"pixel_values": x}``); the pruned model takes the same inputs, in that order, and checks on
            every call the shapes/dtypes its traced Python decisions depended on (``fxprune.capture``).
        data: calibration data for data-driven criteria (ignored by ``l1``/``l2``/``bn_scale``/``random``).
        evaluate: ``evaluate(model) -> float`` (higher is better), for sensitivity-driven stages.
        finetune: ``finetune(model, step)``, called after each pruning step of iterative stages.
        backend: if given (e.g. ``"inductor"``), return ``torch.compile(pruned, backend=backend, fullgraph=True)``
            (in module mode without ``fullgraph``: the model's own forward may break the graph).
        output: ``"graph"`` (default) or ``"module"``: a deep copy of ``model``, same class and Python forward, whose
            parameters, buffers, modules and size attributes are the pruned ones (``fxprune.passes.write_back``).
            The plan is made as in graph mode, except that ``chunk(n)`` items are kept equal; a plan the forward
            cannot pick up (a literal size in it) raises ``ModuleModeError`` naming the node. Not with a recipe
            ``submodule``.

    Returns:
        A ``torch.fx.GraphModule`` whose output shapes equal the model's (compiled when ``backend`` is set). With a
        recipe ``submodule`` (``fxprune.submodule``): the whole model, an ``nn.Module``, in which only that
        submodule was replaced by its pruned ``GraphModule``. With ``output="module"``: the model's own class.

    Example:
        >>> pruned = fxprune.compile(torchvision.models.resnet18(), {"stages": [{"target": {"flops": 0.5}}]},
        ...                          example_inputs=torch.randn(1, 3, 64, 64))
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    recipe = Recipe.load(recipe)
    model = unwrap_model(model)
    _check_model(model)
    inputs = as_input_tuple(example_inputs)
    if output == "module":
        if recipe.submodule:
            raise ModuleModeError(f"recipe submodule '{recipe.submodule}' and output='module' do not combine: module "
                                  "mode already keeps the whole model's class; drop submodule (or use "
                                  "output='graph')")
        return _compile_module(model, recipe, inputs, example_inputs, data=data, evaluate=evaluate,
                               finetune=finetune, backend=backend)
    if recipe.submodule:  # prune one traceable submodule, return the whole model
        scope = SubmoduleScope.capture(model, recipe.submodule, inputs)
        sub = prune_graph(scope.submodule, recipe, scope.inputs, data=scope.calibration_data(data),
                          evaluate=scope.whole_model_callback(evaluate), finetune=scope.whole_model_callback(finetune))
        return scope.finish(sub, recipe, backend=backend)
    # User callbacks may train or run the working model in train mode, and stages that write weights in place (e.g.
    # ``recover``) would write through to the model: they get a private deep copy. Otherwise the copy aliases the
    # model's weights until they are shrunk (half the peak memory on big models).
    private = evaluate is not None or finetune is not None or any(s.writes_weights() for s in recipe.stages)
    work = copy.deepcopy(model) if private else shared_copy(model)
    gm = prune_graph(work.eval(), recipe, inputs, data=data, evaluate=evaluate, finetune=finetune,
                     bind=example_inputs)
    unshare(gm, model)
    gm.train(model.training)
    if backend is not None:
        plan = cast(Plan, gm.fxprune_plan)
        compiled = cast(nn.Module, torch.compile(gm, backend=backend, fullgraph=True))
        attach_result(compiled, plan, recipe)
        return compiled
    return gm


def prune_graph(module: nn.Module, recipe: Recipe, inputs: tuple, *, data: Any = None,
                evaluate: Callable[[nn.Module], float] | None = None,
                finetune: Callable[[nn.Module, int], None] | None = None, bind: Any = None,
                output: str = "graph") -> fx.GraphModule:
    """Trace ``module`` (a private copy, in eval mode: its submodules end up in the result) and run every stage of
    ``recipe`` on it with ``inputs``; returns the shrunk ``GraphModule`` carrying ``fxprune_plan``/``fxprune_recipe``.
    ``bind`` is the example inputs as the user gave them (a dict binds by keyword; default ``inputs``). With
    ``output="module"`` the graph as traced is kept in ``gm.meta`` (for ``WriteBack``), nodes record their source
    lines and the stages plan under ``MODULE_OPTIONS``.

    Raises ``FxPruneError`` if the output shapes changed (outputs are frozen, so they never should).
    """
    module_mode = output == "module"
    gm = trace(module, recipe.leaf_modules, example_inputs=inputs if bind is None else bind,
               strict=recipe.strict_trace, stack_traces=module_mode)
    for line in capture_lines(gm):
        log.info("capture: %s", line)
    record_shapes(gm, inputs)
    if module_mode:
        gm.meta[TRACED] = snapshot(gm)
    before = output_spec(gm)
    plan = Plan()
    given = inputs if bind is None else bind

    def reference(*values: Any) -> Any:  # the model as traced, called as the user calls it
        return call_with(module, given, values)

    for i, stage in enumerate(recipe.stages):
        ctx = ScoreContext(data=data, example_inputs=inputs, evaluate=evaluate, finetune=finetune,
                           options={"stage": f"stages[{i}]"},
                           analysis_options=dict(MODULE_OPTIONS) if module_mode else {},
                           reference=reference if i == 0 else None, output=output)
        plan = plan.compose(stage.run(gm, ctx))
    after = output_spec(gm)
    if before != after:
        raise FxPruneError(f"internal error: output shapes changed from {before} to {after}")
    attach_result(gm, plan, recipe)
    if isinstance(bind, dict):  # keyword inputs: fxprune.save stores their names
        setattr(gm, "fxprune_input_names", list(bind))
    return gm


def _compile_module(model: nn.Module, recipe: Recipe, inputs: tuple, bind: Any, *, data: Any,
                    evaluate: Callable[[nn.Module], float] | None,
                    finetune: Callable[[nn.Module, int], None] | None, backend: str | None) -> nn.Module:
    """``compile(..., output="module")``: prune a traced copy, then write it back into the copy itself."""
    private = evaluate is not None or finetune is not None or any(s.writes_weights() for s in recipe.stages)
    work = copy.deepcopy(model) if private else shared_copy(model)
    modes = {name: m.training for name, m in work.named_modules()}
    layout = hf_layout(work)
    gm = prune_graph(work.eval(), recipe, inputs, data=data, evaluate=evaluate, finetune=finetune, bind=bind,
                     output="module")
    plan = cast(Plan, gm.fxprune_plan)
    to_module(gm, work, plan, inputs, bind, recipe.leaf_modules, layout)
    unshare(work, model)
    for name, m in work.named_modules():
        m.training = modes.get(name, model.training)
    attach_result(work, plan, recipe)
    setattr(work, "fxprune_output", "module")
    setattr(work, "fxprune_input_specs", input_specs(bind))
    if backend is not None:
        compiled = cast(nn.Module, torch.compile(work, backend=backend))
        attach_result(compiled, plan, recipe)
        return compiled
    return work


def attach_result(module: nn.Module, plan: Plan, recipe: Recipe) -> None:
    """Record ``plan`` and ``recipe`` on a pruned result as ``fxprune_plan`` / ``fxprune_recipe``."""
    # setattr: nn.Module's typed __setattr__ names only tensors and modules, these are plain attributes
    setattr(module, "fxprune_plan", plan)
    setattr(module, "fxprune_recipe", recipe)


def output_spec(gm: fx.GraphModule) -> Any:
    """The recorded specs of the graph output's tensors."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [spec_of(a) for a in out.all_input_nodes]


__all__ = ["compile", "prune_graph", "OUTPUTS", "attach_result", "as_input_tuple", "unwrap_model"]
