"""The correctness oracle: a plan applied as zero masks to the original model must compute what the shrunk model
computes.

The masked model is built independently of the rewrite: the original model is traced again and every tensor with
removed channels is zeroed at those channels right where it is produced (``torch.where``, so no NaN leaks).
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .analysis import Analysis, analyze
from .api import compile as fx_compile
from .capture.outputs import output_structure
from .inputs import as_input_tuple, call_with
from .ir.space import Space
from .ir.spec import TensorSpec, spec_of
from .modes import eval_no_grad
from .ops.registry import module_rule
from .outputs import tensors_of
from .passes.replay import apply_plan
from .plan import Plan
from .recipe import Recipe
from .trace import record_shapes, trace


def _zero_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float | None = 1e-5, rms: bool = False) -> torch.Tensor:
    """LayerNorm (``rms``: RMSNorm) over the last ``keep.ndim`` dims whose statistics span only the channels where
    the boolean ``keep`` is true; removed channels output zero. The reference semantics of ``layer_norm:
    renormalize`` (independent of the rewrite, which slices ``weight``/``bias`` and ``normalized_shape``)."""
    dims = tuple(range(-keep.ndim, 0))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = keep.sum().to(x.dtype)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    xk = torch.where(keep, x, zero)
    if rms:
        y = xk * torch.rsqrt((xk * xk).sum(dims, keepdim=True) / n + eps)
    else:
        centred = torch.where(keep, x - xk.sum(dims, keepdim=True) / n, zero)
        y = centred * torch.rsqrt((centred * centred).sum(dims, keepdim=True) / n + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return torch.where(keep, y, zero)


class _MaskedNorm(nn.Module):
    """A leaf ``nn.LayerNorm``/``nn.RMSNorm`` (shared, unmodified) computed by ``masked_layer_norm``."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("keep", keep)
        self.rms = isinstance(norm, nn.RMSNorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_layer_norm(x, self.keep, self.norm.weight, getattr(self.norm, "bias", None), self.norm.eps,
                                 self.rms)


def _norm_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, int]]:
    """(node, input node, number of normalized dims) of every LayerNorm/RMSNorm module or function call."""
    out = []
    for node in gm.graph.nodes:
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if type(m).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward):
                out.append((node, node.args[0], len(m.normalized_shape)))
        elif node.op == "call_function" and node.target in (F.layer_norm, F.rms_norm):
            shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            out.append((node, node.args[0], 1 if isinstance(shape, int) else len(shape)))
    return out


def _renormalize_norms(gm: fx.GraphModule, plan: Plan, norms: list[tuple[fx.Node, fx.Node, int]]) -> None:
    """Replace every norm whose normalized channels lose units by ``masked_layer_norm`` (``layer_norm:
    renormalize`` plans only)."""
    kept = plan.kept_spaces()
    for i, (node, source, k) in enumerate(norms):
        shape = spec_of(source).shape
        keep = torch.ones(shape[len(shape) - k:], dtype=torch.bool)
        for j in range(k):
            idx = kept.get(Space(source.name, 0, len(shape) - k + j))
            if idx is not None:
                m = torch.zeros(shape[len(shape) - k + j], dtype=torch.bool)
                m[torch.as_tensor(idx)] = True
                keep &= m.reshape([-1 if d == j else 1 for d in range(k)])
        if bool(keep.all()):
            continue
        if node.op == "call_module":
            name = f"_fxprune_renorm_{i}"
            gm.add_submodule(name, _MaskedNorm(gm.get_submodule(node.target), keep))
            node.target = name
            continue
        rms = node.target is F.rms_norm
        names = ("input", "normalized_shape", "weight", *(() if rms else ("bias",)), "eps")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        gm.register_buffer(f"_fxprune_renorm_keep_{i}", keep)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(f"_fxprune_renorm_keep_{i}")
        node.target = masked_layer_norm
        node.args = (node.args[0], attr, given.get("weight"), given.get("bias"),
                     given.get("eps", None if rms else 1e-5), rms)
        node.kwargs = {}


def masked_model(model: nn.Module, plan: Plan, example_inputs: Sequence[Any],
                 leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    """The original model with every channel the plan removes zeroed wherever it appears.

    With ``plan.options["layer_norm"] == "renormalize"``, every LayerNorm/RMSNorm whose normalized channels lose
    units computes ``masked_layer_norm``: statistics over the kept channels only, zeros at the removed ones.

    The result shares (unmodified) submodules with ``model``: run it in eval mode through ``_run_eval``. Leaf
    modules whose rules prune internal axes no graph tensor shows (attention heads: ``mask_removed``) are deep
    copies with the removed slices zeroed; ``model`` itself is never modified.
    """
    gm = trace(model, leaf_modules, example_inputs=example_inputs)
    with eval_no_grad(gm):
        record_shapes(gm, as_input_tuple(example_inputs))
    _mask_leaf_internals(gm, plan)
    norms = _norm_nodes(gm) if plan.options.get("layer_norm") == "renormalize" else []
    by_node: dict[str, dict[int, torch.Tensor]] = {}
    for space, kept in plan.kept_spaces().items():
        if space.is_param:
            continue
        by_node.setdefault(space.owner, {})[space.dim] = torch.as_tensor(kept)
    count = 0
    for node in list(gm.graph.nodes):
        dims = by_node.get(node.name)
        spec = spec_of(node)
        if not dims or not isinstance(spec, TensorSpec):
            continue
        keep = torch.ones(spec.shape, dtype=torch.bool)
        for d, kept in dims.items():
            m = torch.zeros(spec.shape[d], dtype=torch.bool)
            m[kept] = True
            keep &= m.reshape([-1 if i == d else 1 for i in range(len(spec.shape))])
        name = f"_fxprune_keep_{count}"
        count += 1
        gm.register_buffer(name, keep)
        with gm.graph.inserting_after(node):
            attr = gm.graph.get_attr(name)
        with gm.graph.inserting_after(attr):
            masked = gm.graph.call_function(_zero_masked, (node, attr))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
    _renormalize_norms(gm, plan, norms)
    gm.graph.lint()
    gm.recompile()
    return gm


def _mask_leaf_internals(gm: fx.GraphModule, plan: Plan) -> None:
    """Zero what removed units own inside leaf modules whose rule says how (``rule.mask_removed(module, axis,
    removed)``), in deep copies registered on ``gm`` under new names, so no module of the user's model changes."""
    copies: dict[str, nn.Module] = {}
    for space, kept in plan.kept_spaces().items():
        path = space.owner[1:]
        if not space.is_param or not path:
            continue
        if path not in copies:
            try:
                module = gm.get_submodule(path)
            except AttributeError:  # a tensor attribute: masked in the graph
                continue
            rule = module_rule(module)
            if rule is None or not hasattr(rule, "mask_removed"):
                continue
            copies[path] = copy.deepcopy(module)
            name = f"_fxprune_masked_{len(copies)}"
            gm.add_submodule(name, copies[path])
            for node in gm.graph.nodes:
                if node.op == "call_module" and node.target == path:
                    node.target = name
        rule = module_rule(copies[path])
        rule.mask_removed(copies[path], space.dim, np.setdiff1d(np.arange(plan.sizes[space.key()]), kept))


def _run_eval(module: nn.Module, inputs: tuple) -> Any:
    with eval_no_grad(module):
        return module(*inputs)




def assert_masked_equals_shrunk(
    model: nn.Module,
    plan: Plan,
    inputs: Sequence[Any],
    shrunk: nn.Module | None = None,
    *,
    leaf_modules: Sequence[str] = (),
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> None:
    """Assert that ``shrunk`` equals ``model`` with the plan's channels zero-masked, on ``inputs``.

    Args:
        model: the original, unpruned model.
        plan: the plan (``pruned.fxprune_plan``).
        inputs: a tensor, a tuple of inputs or a dict of keyword inputs (as given to ``fxprune.compile``).
        shrunk: the physically pruned model; defaults to replaying ``plan`` on ``model``.
        atol, rtol: tolerances; ``atol`` is scaled by the largest output magnitude (randomly initialised deep
            nets reach large activations, and float32 sums in another order differ by a relative amount).
    """
    bind, inputs = inputs, as_input_tuple(inputs)
    if shrunk is None:
        shrunk = trace(copy.deepcopy(model).eval(), leaf_modules, example_inputs=bind)
        record_shapes(shrunk, inputs)
        apply_plan(shrunk, plan, inputs)
    masked = masked_model(model, plan, bind, leaf_modules)
    _assert_outputs_equal(_run_eval(masked, inputs), _run_eval(shrunk, inputs), "masked", "shrunk", atol, rtol)


def _assert_outputs_equal(want_out: Any, got_out: Any, wname: str, gname: str, atol: float, rtol: float) -> None:
    """Same output structure and tensors (``atol`` scaled by the largest magnitude of each ``want`` tensor)."""
    want_structure, got_structure = output_structure(want_out), output_structure(got_out)
    assert want_structure[0] == got_structure[0], \
        f"{wname} model returns {want_structure[0]}, {gname} model {got_structure[0]}"
    want, got = tensors_of(want_out), tensors_of(got_out)
    assert len(want) == len(got), f"{wname} model returns {len(want)} tensors, {gname} model {len(got)}"
    for i, (w, g) in enumerate(zip(want, got)):
        assert w.shape == g.shape, f"output {i}: {wname} shape {tuple(w.shape)} != {gname} shape {tuple(g.shape)}"
        scale = max(1.0, float(w.abs().max())) if w.numel() and w.is_floating_point() else 1.0
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol,
                                   msg=lambda m: f"output {i}: {gname} != {wname}: {m}")


def replay_graph(model: nn.Module, plan: Plan, inputs: Any, leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    """Graph mode replaying ``plan`` on a copy of ``model`` traced at ``inputs`` (a tensor, tuple or dict)."""
    gm = trace(copy.deepcopy(model).eval(), leaf_modules, example_inputs=inputs)
    record_shapes(gm, as_input_tuple(inputs))
    return apply_plan(gm, plan, as_input_tuple(inputs))


def _with_inserted_weights(gm: fx.GraphModule, model: nn.Module, result: nn.Module) -> fx.GraphModule:
    """Give the modules a rewrite inserted into a replayed ``gm`` (the ``patches`` proposal, built afresh) the
    weights of the modules of the same type in ``result``, in order: replays then compute with the same weights."""
    known = {id(m) for m in model.modules()} | {type(m) for m in model.modules()}
    mine = [m for name, m in gm.named_children() if type(m) not in known and id(m) not in known]
    theirs = {t: [m for m in result.modules() if type(m) is t] for t in {type(m) for m in mine}}
    for m in mine:
        if theirs[type(m)]:
            m.load_state_dict(theirs[type(m)].pop(0).state_dict())
    return gm


def assert_module_matches(model: nn.Module, result: nn.Module, example_inputs: Any, second_inputs: Any, *,
                          leaf_modules: Sequence[str] = (), atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Assert that ``result`` (``fxprune.compile(model, ..., output="module")``) is the plan applied to ``model``:

    * its class is ``model``'s;
    * on ``example_inputs`` it computes what graph mode replaying the same plan computes;
    * on ``second_inputs`` (another input size the architecture accepts, or another batch size) it computes what
      the masked oracle re-traced at that size computes (``masked_model``), or, for a plan with graph rewrites
      (``blocksparse``, ``patches``), what graph mode replaying the plan at that size computes. A shape the trace
      specialised (anchors, position tables) therefore cannot leak into the result.

    Inputs are a tensor, a tuple, or a dict of keyword inputs (then ``result`` is called by keyword).
    """
    assert type(result) is type(model), f"module mode returned {type(result).__name__}, not {type(model).__name__}"
    plan = result.fxprune_plan
    graph = _with_inserted_weights(replay_graph(model, plan, example_inputs, leaf_modules), model, result)
    with eval_no_grad(result):
        got = call_with(result, example_inputs)
    _assert_outputs_equal(_run_eval(graph, as_input_tuple(example_inputs)), got, "graph-mode", "module-mode",
                          atol, rtol)
    second = as_input_tuple(second_inputs)
    oracle = masked_model(model, plan, second_inputs, leaf_modules) if not plan.rewrites \
        else _with_inserted_weights(replay_graph(model, plan, second_inputs, leaf_modules), model, result)
    with eval_no_grad(result):
        got = call_with(result, second_inputs)
    _assert_outputs_equal(_run_eval(oracle, second), got, "masked" if not plan.rewrites else "graph-mode",
                          "module-mode (second inputs)", atol, rtol)


def _digest(t: torch.Tensor) -> tuple:
    """Shape, dtype and SHA-1 of a tensor's bytes: detects any change without keeping a copy."""
    data = t.detach().cpu().contiguous().reshape(-1)
    raw = data.view(torch.uint8) if data.dtype != torch.bool and data.numel() else data.to(torch.uint8)
    return tuple(t.shape), str(t.dtype), hashlib.sha1(raw.numpy().tobytes()).hexdigest()


def state_digest(model: nn.Module) -> dict[str, tuple]:
    """Shape, dtype and SHA-1 of every state-dict entry: ``state_digest(m) == before`` proves ``m`` unchanged (keys,
    shapes and bytes) without keeping a copy of its weights."""
    return {k: _digest(v) for k, v in model.state_dict().items()}


def assert_compiles(model: nn.Module, *inputs: Any, backend: str = "aot_eager", atol: float = 1e-5,
                    rtol: float = 1e-5) -> nn.Module:
    """Assert that ``torch._dynamo.explain`` finds one graph and no graph break in ``model(*inputs)``, and that
    ``torch.compile(model, backend=backend, fullgraph=True)`` computes what eager does. Returns the compiled model."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*inputs)
    name = type(model).__name__
    assert explained.graph_break_count == 0, \
        f"{name}: {explained.graph_break_count} graph breaks: {explained.break_reasons}"
    assert explained.graph_count == 1, f"{name}: dynamo made {explained.graph_count} graphs, not 1"
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        want, got = tensors_of(model(*inputs)), tensors_of(compiled(*inputs))
    assert len(want) == len(got), f"{name}: eager returns {len(want)} tensors, compiled {len(got)}"
    for i, (w, g) in enumerate(zip(want, got)):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name} output {i}: compiled != eager: {m}")
    return compiled


def prune_and_check(model: nn.Module, recipe: Any, inputs: Any, *, atol: float = 1e-4,
                    rtol: float = 1e-4) -> fx.GraphModule:
    """``fxprune.compile`` then ``assert_masked_equals_shrunk``; also checks the input model was not modified."""
    inputs = inputs if isinstance(inputs, dict) else as_input_tuple(inputs)
    recipe = Recipe.load(recipe)
    state = state_digest(model)  # digests, not clones: vit_h_14 is 2.5 GB
    pruned = fx_compile(model, recipe, example_inputs=inputs)
    after = state_digest(model)
    changed = sorted(k for k in state.keys() | after.keys() if state.get(k) != after.get(k))
    assert not changed, f"compile modified the input model at {changed}"
    assert_masked_equals_shrunk(model, pruned.fxprune_plan, inputs, pruned, leaf_modules=recipe.leaf_modules,
                                atol=atol, rtol=rtol)
    return pruned


def analyze_model(model: nn.Module, *inputs: torch.Tensor) -> Analysis:
    """Trace, record shapes and analyze ``model`` (a deep copy) in eval mode."""
    gm = trace(copy.deepcopy(model).eval(), example_inputs=inputs)
    record_shapes(gm, inputs)
    return analyze(gm)


def units_of(a: Analysis, key: str) -> np.ndarray:
    """Unit id of every slot of the space named ``key`` (e.g. ``'@conv1:0:0'``)."""
    i = a.index[Space.parse(key)]
    return a.slot_unit[a.offsets[i]: a.offsets[i] + a.sizes[i]]


def frozen_of(a: Analysis, key: str) -> np.ndarray:
    """Whether each slot of the space ``key`` belongs to a frozen unit."""
    return a.unit_frozen[units_of(a, key)]


def channel_recipe(target: float, kind: str = "sparsity", **fields: Any) -> dict:
    """A one-stage channel recipe, e.g. ``channel_recipe(0.5, "flops", criterion="l1")``."""
    return {"stages": [{"kind": "channels", "target": {kind: target}, **fields}]}


__all__ = ["assert_masked_equals_shrunk", "assert_module_matches", "replay_graph",
           "assert_compiles", "masked_model", "masked_layer_norm",
           "prune_and_check", "state_digest", "analyze_model", "units_of", "frozen_of", "channel_recipe"]

