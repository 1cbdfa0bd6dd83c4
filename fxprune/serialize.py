"""Saving and loading pruned models without pickle.

``fxprune.save(pruned, "model.fxp")`` writes ONE file, a plain `safetensors <https://github.com/huggingface/safetensors>`_
file: its tensors are the pruned model's ``state_dict`` and its string header metadata holds

* ``format`` = ``"fxprune.model"`` and ``format_version`` (currently ``"1"``),
* ``plan``: the plan JSON (``Plan.to_json``: kept indices relative to the original model),
* ``leaf_modules``: a JSON list, the recipe's leaf modules (the replay must trace the same graph),
* ``submodule``: the recipe's submodule path (``fxprune.submodule``), ``""`` for a whole-model plan;
  a scoped file holds the whole model's tensors and its ``inputs`` are the submodule's captured inputs,
* ``inputs``: a JSON list of the example inputs' shapes and dtypes (used when ``load`` gets no inputs),
* ``training``: ``"true"``/``"false"``, the pruned model's mode, restored by ``load``,
* ``output``: ``"graph"`` or ``"module"`` (``fxprune.compile(..., output=...)``): ``load`` rebuilds the same kind,
  a ``GraphModule`` or the architecture's own class (the plan replayed on a trace, written back into the model),
* ``fxprune_version`` and ``torch_version`` (informational).

``fxprune.load(path, model_or_constructor, example_inputs)`` traces the original architecture again, replays the
plan (``passes.replay.apply_plan``: channels, then recorded rewrites) and then loads the saved tensors, so weights
changed after pruning (fine-tuning) survive. Any safetensors reader can open the file; nothing in it is executable.
"""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FxPruneError, PlanError
from .inputs import as_input_tuple, input_specs
from .ir.spec import TensorSpec, spec_of
from .passes.graph_diff import snapshot
from .passes.hf_config import hf_layout
from .passes.replay import apply_plan
from .passes.write_back import TRACED, to_module
from .plan import Plan
from .recover.bias import add_missing_biases
from .trace import record_shapes, trace, unwrap

log = logging.getLogger(__name__)

FORMAT = "fxprune.model"
FORMAT_VERSION = "1"
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                               torch.int16, torch.int32, torch.int64, torch.bool)}


def _unwrap(pruned: nn.Module) -> nn.Module:
    """The ``GraphModule`` behind a ``torch.compile``d result (``fxprune.compile(..., backend=...)``)."""
    inner = getattr(pruned, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else pruned


def _leaf_modules_of(pruned: nn.Module, leaf_modules: Sequence[str] | None) -> list[str]:
    if leaf_modules is not None:
        return list(leaf_modules)
    recipe = getattr(pruned, "fxprune_recipe", None)
    return list(getattr(recipe, "leaf_modules", []) or [])




def _input_specs(module: nn.Module, submodule: str, example_inputs: Any) -> list[dict]:
    """Shapes and dtypes of the inputs the replay records shapes with: the model's, or for a scoped plan the
    submodule's (captured from ``example_inputs`` run through the whole model, else those compile captured)."""
    if submodule and example_inputs is None:
        return list(getattr(module, "fxprune_submodule_inputs", []))
    if example_inputs is None:
        return list(getattr(module, "fxprune_input_specs", None) or traced_input_specs(module))
    names = list(example_inputs) if isinstance(example_inputs, dict) and not submodule else None
    inputs = as_input_tuple(example_inputs)
    if submodule:
        from .submodule import capture_inputs

        inputs = capture_inputs(module, submodule, inputs)[0]
    specs = [{"shape": list(t.shape), "dtype": str(t.dtype)} for t in inputs if isinstance(t, torch.Tensor)]
    if names is not None and len(names) == len(specs):  # keyword inputs: load binds them by name again
        for spec, name in zip(specs, names):
            spec["name"] = name
    return specs


def traced_input_specs(module: nn.Module) -> list[dict]:
    """Shapes and dtypes of the tensors the pruned ``GraphModule`` was traced and shrunk with: the shapes recorded
    on its placeholders (``[]`` for a module that is not a traced graph)."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, fx.Graph):
        return []
    specs = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        spec = spec_of(node)
        if isinstance(spec, TensorSpec):
            specs.append({"shape": list(spec.shape), "dtype": str(spec.dtype)})
    names = getattr(module, "fxprune_input_names", None)  # keyword inputs: load binds them by name again
    if names is not None and len(names) == len(specs):
        for spec, name in zip(specs, names):
            spec["name"] = name
    return specs


def save(pruned: nn.Module, path: str | Path, *, leaf_modules: Sequence[str] | None = None,
         example_inputs: Any = None) -> Path:
    """Write ``pruned`` (a result of ``fxprune.compile``) to the single safetensors file ``path``.

    Args:
        pruned: the pruned model; it must carry ``fxprune_plan`` (a ``torch.compile``d result is unwrapped).
        path: the file to write (conventionally ``*.fxp``); parent directories are created.
        leaf_modules: the recipe's ``leaf_modules`` if it had any (default: ``pruned.fxprune_recipe``'s, else none).
        example_inputs: optional: the shapes and dtypes ``load`` rebuilds inputs from when it is given none. By
            default those the model was pruned with (recorded on its graph inputs).

    Returns:
        The path written.

    Example:
        >>> fxprune.save(pruned, "resnet18.fxp")
        >>> again = fxprune.load("resnet18.fxp", torchvision.models.resnet18, torch.randn(1, 3, 64, 64))
    """
    plan = getattr(pruned, "fxprune_plan", None)
    if not isinstance(plan, Plan):
        raise FxPruneError("fxprune.save needs a model returned by fxprune.compile (it has no 'fxprune_plan')")
    module = _unwrap(pruned)
    # Clones: safetensors refuses tensors that share storage (tied weights); loading fills every key again.
    # A scoped model may hold a torch.compile'd submodule: its keys lose the wrapper's "_orig_mod." part.
    tensors = {k.replace("_orig_mod.", ""): v.detach().to("cpu").contiguous().clone()
               for k, v in module.state_dict().items()}
    submodule = getattr(module, "fxprune_submodule", "")  # set for a recipe submodule (compile and load)
    inputs = _input_specs(module, submodule, example_inputs)
    from . import __version__

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "plan": plan.to_json(),
            "leaf_modules": json.dumps(_leaf_modules_of(pruned, leaf_modules)), "inputs": json.dumps(inputs),
            "submodule": submodule, "output": _output_of(module),
            "training": json.dumps(bool(module.training)), "fxprune_version": __version__,
            "torch_version": torch.__version__}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    log.info("saved %d tensors and a plan of %d spaces to %s", len(tensors), len(plan.kept), out)
    return out


def _output_of(module: nn.Module) -> str:
    return "module" if getattr(module, "fxprune_output", "graph") == "module" else "graph"


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded header of an fxprune file: ``plan`` (a ``Plan``), ``leaf_modules``, ``inputs`` and versions."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fxprune file '{p}' does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FxPruneError(f"'{p}' is not an fxprune file (not a safetensors file: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise FxPruneError(f"'{p}' is a safetensors file but not an fxprune file (no format '{FORMAT}' in its header)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FxPruneError(f"'{p}' has fxprune format version {meta.get('format_version')!r}; this fxprune reads "
                           f"{FORMAT_VERSION}")
    try:
        return {"plan": Plan.from_json(meta["plan"]), "leaf_modules": json.loads(meta.get("leaf_modules", "[]")),
                "inputs": json.loads(meta.get("inputs", "[]")), "training": json.loads(meta.get("training", "false")),
                "submodule": meta.get("submodule", ""), "output": meta.get("output", "graph"),
                "fxprune_version": meta.get("fxprune_version"),
                "torch_version": meta.get("torch_version")}
    except (KeyError, json.JSONDecodeError) as exc:
        raise FxPruneError(f"'{p}' has a damaged fxprune header: {exc}") from exc


def _instantiate(model_or_constructor: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(model_or_constructor, nn.Module):
        return copy.deepcopy(unwrap(model_or_constructor)[0])  # never touch the caller's model
    if callable(model_or_constructor):
        model = model_or_constructor()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the constructor returned {type(model).__name__}, not a torch.nn.Module")
        return unwrap(model)[0]
    raise TypeError(f"expected an nn.Module or a zero-argument constructor, got {type(model_or_constructor).__name__}")


def _default_inputs(specs: list[dict], path: Path) -> Any:
    """Zeros of the stored input shapes: a tuple, or a dict for keyword inputs."""
    if not specs:
        raise FxPruneError(f"'{path}' stores no example input shapes: pass example_inputs to fxprune.load")
    values = tuple(torch.zeros(s["shape"], dtype=_DTYPES.get(s["dtype"], torch.float32)) for s in specs)
    if all("name" in s for s in specs):
        return {s["name"]: v for s, v in zip(specs, values)}
    return values


def _load_weights(gm: nn.Module, tensors: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    add_missing_biases(gm, tensors)  # biases that recovery (``recover: [bias]`` / ``[lstsq]``) added
    own = gm.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        which = (f"missing from the file: {', '.join(missing[:3])}" if missing
                 else f"unknown to the model: {', '.join(extra[:3])}")
        raise PlanError(f"'{path}' does not fit {arch}: its tensors differ from the pruned model's ({which})")
    for key, value in tensors.items():
        if tuple(own[key].shape) != tuple(value.shape):
            module = key.rsplit(".", 1)[0]
            raise PlanError(f"'{path}' does not fit {arch}: module '{module}' has '{key}' of shape "
                            f"{tuple(own[key].shape)} after replaying the plan, the file holds {tuple(value.shape)}")
    gm.load_state_dict(tensors, strict=True)


def _replay_module(model: nn.Module, plan: Plan, leaf_modules: Sequence[str], bind: Any, inputs: tuple) -> nn.Module:
    """Module mode replayed: ``plan`` applied to a trace of ``model``, then written back into ``model`` itself."""
    layout = hf_layout(model)
    gm = trace(model.eval(), leaf_modules, example_inputs=bind, stack_traces=True)
    record_shapes(gm, inputs)
    gm.meta[TRACED] = snapshot(gm)
    apply_plan(gm, plan, inputs)
    return to_module(gm, model, plan, inputs, bind, leaf_modules, layout)


def load(path: str | Path, model_or_constructor: nn.Module | Callable[[], nn.Module],
         example_inputs: Any = None) -> nn.Module:
    """Rebuild a pruned model saved with ``fxprune.save``.

    The plan is replayed on the original architecture and the saved weights are then loaded into the result.

    Args:
        path: a file written by ``fxprune.save``.
        model_or_constructor: the ORIGINAL (unpruned) architecture: an instance (deep-copied, never modified; its
            weights are replaced) or a zero-argument constructor such as ``torchvision.models.resnet18``.
        example_inputs: a tensor, tuple or dict of keyword inputs the model accepts, used to trace and record
            shapes while replaying (pass the form given to ``fxprune.compile``). Default: zeros of the shapes
            ``save`` stored (the pruned model's own example-input shapes, by name for keyword inputs).

    Returns:
        A ``torch.fx.GraphModule`` with ``fxprune_plan``, in the train/eval mode the pruned model was saved in; for
        a file saved from a recipe with ``submodule``, the whole model with that submodule replayed; for a file
        saved from ``output="module"``, the architecture's own class (module mode replayed: ``fxprune_output``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FxPruneError: the file is not an fxprune file.
        PlanError: the plan or the weights do not fit the model (the message names the space or module).
    """
    p = Path(path)
    meta = read_metadata(p)
    plan: Plan = meta["plan"]
    model = _instantiate(model_or_constructor)
    arch = type(model).__name__
    bind = _default_inputs(meta["inputs"], p) if example_inputs is None else example_inputs
    inputs = as_input_tuple(bind)
    gm: nn.Module
    try:
        if meta["submodule"]:  # partial tracing: replay on the same submodule, return the whole model
            from .submodule import capture_inputs, replay_submodule

            sub_inputs = inputs if example_inputs is None else capture_inputs(model, meta["submodule"], inputs)[0]
            gm = replay_submodule(model, meta["submodule"], plan, meta["leaf_modules"], sub_inputs)
        elif meta["output"] == "module":
            gm = _replay_module(model, plan, meta["leaf_modules"], bind, inputs)
        else:
            gm = trace(model.eval(), meta["leaf_modules"], example_inputs=bind)
            record_shapes(gm, inputs)
            apply_plan(gm, plan, inputs)
    except PlanError as exc:
        raise PlanError(f"the plan in '{p}' does not fit {arch}: {exc}") from exc
    _load_weights(gm, load_file(str(p)), p, arch)
    setattr(gm, "fxprune_plan", plan)  # nn.Module's typed __setattr__ names only tensors and modules
    if meta["output"] == "module":
        setattr(gm, "fxprune_output", "module")
        setattr(gm, "fxprune_input_specs", input_specs(bind))
    elif isinstance(bind, dict):
        setattr(gm, "fxprune_input_names", list(bind))
    gm.train(bool(meta["training"]))
    log.info("loaded %s from %s (%d spaces shrunk)", arch, p, len(plan.kept))
    return gm


__all__ = ["save", "load", "read_metadata", "FORMAT", "FORMAT_VERSION"]
