"""Partial tracing: prune one traceable submodule of a model that torch.fx cannot trace as a whole.

Detectors (Faster R-CNN, RetinaNet, FCOS, SSD) run data-dependent Python (resizing, anchors, NMS) that torch.fx
cannot follow, but their backbones are plain tensor programs. A recipe with ``submodule: backbone`` prunes only
that part:

1. the whole model (a deep copy, eval mode) runs once on ``example_inputs`` while a forward pre-hook records the
   arguments the submodule really receives (the resized, batched image tensor of a detector);
2. the submodule is traced and pruned by the usual stage loop (``api.prune_graph``) on those arguments. Its
   outputs are graph outputs, which are frozen, so the channels crossing the boundary stay and the rest of the
   model (heads, FPN consumers) needs no change;
3. the pruned ``GraphModule`` replaces the submodule in the copy (set on its parent module), and the whole model
   runs again: its output structure must be unchanged.

The result is the whole model (an ``nn.Module``) carrying ``fxprune_plan`` (spaces named after the submodule's
graph) and ``fxprune_recipe``. ``fxprune.save``/``fxprune.load`` store the submodule path and replay the plan on
the same submodule.

Example:
    >>> det = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, min_size=128)
    >>> pruned = fxprune.compile(det.eval(), {"submodule": "backbone", "stages": [{"target": {"flops": 0.3}}]},
    ...                          example_inputs=([torch.rand(3, 128, 128)],))
"""
from __future__ import annotations

import copy
import difflib
import inspect
import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import ExampleInputsError, FxPruneError
from .recipe import Recipe

log = logging.getLogger(__name__)


def resolve_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model``'s submodule at the dotted ``path``; ``FxPruneError`` naming the path (and a close name) if absent."""
    module, walked = model, []
    for part in path.split("."):
        children = dict(module.named_children())
        if part not in children:
            where = (f"'{'.'.join(walked)}' ({type(module).__name__})" if walked
                     else f"the model ({type(model).__name__})")
            close = difflib.get_close_matches(part, children, n=1)
            hint = f"did you mean '{'.'.join(walked + [close[0]])}'? " if close else ""
            raise FxPruneError(f"recipe submodule '{path}': {where} has no submodule '{part}'; {hint}"
                               f"its children are: {', '.join(children) or 'none'}")
        module = children[part]
        walked.append(part)
    return module


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` by ``new`` (an attribute set on its parent module)."""
    parent, _, name = path.rpartition(".")
    setattr(resolve_submodule(model, parent) if parent else model, name, new)


def _positional(module: nn.Module, path: str, args: tuple, kwargs: dict) -> tuple:
    """The call's arguments as the positional tuple a trace of ``module`` takes (keywords bound by the signature)."""
    if not kwargs:
        return args
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise FxPruneError(f"recipe submodule '{path}' was called with arguments its forward does not accept: "
                           f"{exc}") from exc
    out: list[Any] = []
    for name, param in inspect.signature(module.forward).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.KEYWORD_ONLY):
            if name in bound.arguments:
                raise FxPruneError(f"recipe submodule '{path}' ({type(module).__name__}) gets '{name}' as "
                                   f"{param.kind.description} argument; a traced submodule takes positional "
                                   f"inputs only")
            continue
        out.append(bound.arguments.get(name, param.default))
    return tuple(out)


def capture_inputs(model: nn.Module, path: str, inputs: tuple) -> tuple[tuple, Any]:
    """Run ``model(*inputs)`` (eval mode, restored after; no grad); return (the submodule's first-call inputs as
    a positional tuple, the model's output).

    Raises ``FxPruneError`` naming ``path`` when the submodule is never called, ``ExampleInputsError`` when the
    model does not run on ``inputs``.
    """
    sub = resolve_submodule(model, path)
    calls: list[tuple[tuple, dict]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, (args, kwargs)))

    handle = sub.register_forward_pre_hook(hook, with_kwargs=True)
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            out = model.eval()(*inputs)
    except FxPruneError:
        raise
    except Exception as exc:  # the user's model raises anything on bad inputs
        raise ExampleInputsError(f"example_inputs do not run through {type(model).__name__} (needed to capture the "
                                 f"inputs of submodule '{path}'): {type(exc).__name__}: {exc}") from exc
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if not calls:
        raise FxPruneError(f"recipe submodule '{path}' ({type(sub).__name__}) was never called while "
                           f"{type(model).__name__} ran on example_inputs: its inputs cannot be captured; choose a "
                           f"submodule the forward calls")
    if len(calls) > 1:
        log.warning("submodule '%s' is called %d times per forward; pruning uses the first call's inputs",
                    path, len(calls))
    args = _positional(sub, path, *calls[0])
    for i, arg in enumerate(args):
        if isinstance(arg, (dict, list, tuple)) and any(isinstance(t, torch.Tensor) for t in tree_flatten(arg)[0]):
            parent = path.rpartition(".")[0]
            hint = f"choose its parent '{parent}' or " if parent else ""
            raise FxPruneError(f"recipe submodule '{path}' ({type(sub).__name__}) gets tensors packed in a "
                               f"{type(arg).__name__} as input {i}; fxprune traces submodules whose inputs are "
                               f"tensors: {hint}choose a submodule called with tensors")
    return args, out


def structure(value: Any) -> Any:
    """The nesting of containers, dict keys and tensor (dtype, trailing shape) of an output, for comparisons.

    The leading dim is left out: a detector's number of detections per image depends on the weights.
    """
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape[1:]))
    if isinstance(value, dict):
        return (type(value).__name__, tuple((k, structure(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(structure(v) for v in value))
    return type(value).__name__


def _scoped_data(work: nn.Module, path: str, data: Any) -> list | None:
    """Whole-model calibration batches (tensors or input tuples) turned into the submodule's captured inputs.

    Labels describe the whole model's output, not the submodule's, so labeled batches are refused.
    """
    if data is None:
        return None
    from .api import as_input_tuple

    out = []
    for batch in data:
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
                and not batch[1].is_floating_point():
            raise FxPruneError(f"recipe submodule '{path}': calibration data with labels cannot score a submodule "
                               f"(the loss is defined on the whole model's output); pass unlabeled batches")
        out.append(capture_inputs(work, path, as_input_tuple(batch))[0])
    return out


def _with_whole(work: nn.Module, path: str, fn: Callable | None) -> Callable | None:
    """Wrap a user callback written for the whole model so stages can call it with the pruned submodule."""
    if fn is None:
        return None
    current = resolve_submodule(work, path)

    def call(sub: nn.Module, *rest: Any) -> Any:
        set_submodule(work, path, sub)
        try:
            return fn(work, *rest)
        finally:
            set_submodule(work, path, current)

    return call


def compile_submodule(model: nn.Module, recipe: Recipe, inputs: tuple, *, data: Iterable | None = None,
                      evaluate: Callable[[nn.Module], float] | None = None,
                      finetune: Callable[[nn.Module, int], None] | None = None,
                      backend: str | None = None) -> nn.Module:
    """``fxprune.compile`` for a recipe with ``submodule``: prune that submodule, return the whole (copied) model.

    ``evaluate(model)``/``finetune(model, step)`` and ``data`` keep their whole-model meaning. With ``backend``,
    only the pruned submodule is ``torch.compile``d (the rest of the model may not be traceable).
    """
    from .api import prune_graph  # api imports this module lazily

    path = recipe.submodule
    resolve_submodule(model, path)  # fail on a bad path before any copying
    work = copy.deepcopy(model).eval()
    sub_inputs, before = capture_inputs(work, path, inputs)
    sub = resolve_submodule(work, path)  # traced and shrunk in place: ``work`` is private
    gm = prune_graph(sub, recipe, sub_inputs, data=_scoped_data(work, path, data),
                     evaluate=_with_whole(work, path, evaluate), finetune=_with_whole(work, path, finetune))
    set_submodule(work, path, gm if backend is None else torch.compile(gm, backend=backend, fullgraph=True))
    with torch.no_grad():
        after = work(*inputs)
    if structure(before) != structure(after):
        raise FxPruneError(f"internal error: pruning submodule '{path}' changed the model's output structure from "
                           f"{structure(before)} to {structure(after)}")
    work.train(model.training)
    work.fxprune_plan = gm.fxprune_plan
    work.fxprune_recipe = recipe
    _mark(work, path, sub_inputs)
    log.info("pruned submodule '%s' (%s) of %s: %d spaces shrunk", path, type(sub).__name__, type(model).__name__,
             len(gm.fxprune_plan.kept))
    return work


def replay_submodule(model: nn.Module, path: str, plan: Any, leaf_modules: list, sub_inputs: tuple) -> nn.Module:
    """Replay ``plan`` on ``model``'s submodule ``path`` in place (for ``fxprune.load``): trace it, record shapes
    on the submodule's inputs ``sub_inputs``, apply the plan and put the ``GraphModule`` back; returns ``model``."""
    from .passes.replay import apply_plan
    from .trace import record_shapes, trace

    gm = trace(resolve_submodule(model, path).eval(), leaf_modules, example_inputs=sub_inputs)
    record_shapes(gm, sub_inputs)
    apply_plan(gm, plan, sub_inputs)
    set_submodule(model, path, gm)
    _mark(model, path, sub_inputs)
    return model


def _mark(model: nn.Module, path: str, sub_inputs: tuple) -> None:
    """Attributes ``fxprune.save`` reads from a scoped model: the submodule path and its inputs' shapes."""
    model.fxprune_submodule = path
    model.fxprune_submodule_inputs = [{"shape": list(t.shape), "dtype": str(t.dtype)}
                                      for t in sub_inputs if isinstance(t, torch.Tensor)]


__all__ = ["compile_submodule", "capture_inputs", "resolve_submodule", "set_submodule", "replay_submodule", "structure"]
