"""``WriteBack``: carry a pruned ``GraphModule`` back into a copy of the user's model (``output="module"``).

A ``GraphModule`` built from a root reuses the root's leaf modules (``call_module`` targets: shrunk in place, they
are already the copy's) but makes fresh plain containers and installs ``get_attr`` tensors on them. The stages
replace tensors and whole modules (``PrunedMultiheadAttention``, ``BlockSparseLinear``, ...) on the
``GraphModule``. ``WriteBack`` sets each replaced parameter, buffer and module at the same qualified path of the
copy (and wherever else the copy holds the same object, so tied weights stay tied), sets the module attributes the
forward reads its sizes from (``graph_diff.explain``), and lets registered module-mode translations of graph
rewrites put their modules into the tree (``register_module_rewrite``; ``patches`` does).

``requires`` refuses (``ModuleModeError``) what the forward cannot pick up, ``call`` writes, and ``ensures`` runs the
copy on the example inputs: it must compute what the ``GraphModule`` computes, else the first node whose shape
differs in a re-trace of the copy is named.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import ModuleModeError
from ..inputs import call_with
from ..ir.spec import TensorSpec, spec_of
from ..modes import eval_no_grad
from ..outputs import tensors_of
from ..plan import Plan
from ..trace import record_shapes, trace
from .graph_diff import Traced, explain, refusal, source_of
from .hf_config import HfLayout, update_hf_config

log = logging.getLogger(__name__)

#: ``gm.meta`` key of the ``graph_diff.Traced`` snapshot taken before the first stage
TRACED = "fxprune_traced"
#: analysis options every stage plans under in module mode (the forward's ``chunk(n)`` must stay even)
MODULE_OPTIONS = {"chunks": "even"}


@dataclass
class Claim:
    """What a module-mode translation of one ``Plan.rewrites`` entry accounts for.

    Attributes:
        nodes: names of the nodes the rewrite inserted.
        alias: inserted node -> traced node whose place it takes for its users.
        paths: ``GraphModule`` submodule paths the rewrite added (carried by ``apply``, not copied).
        apply: ``apply(model)`` puts the rewrite into the user's module tree.
    """

    nodes: set[str] = field(default_factory=set)
    alias: dict[str, str] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)
    apply: Callable[[nn.Module], None] | None = None


ModuleRewrite = Callable[[fx.GraphModule, dict, nn.Module], Claim]
_MODULE_REWRITES: dict[str, ModuleRewrite] = {}


def register_module_rewrite(name: str) -> Callable[[ModuleRewrite], ModuleRewrite]:
    """Register ``fn(gm, entry, model) -> Claim``: the module-mode form of the ``Plan.rewrites`` entries whose
    ``"pass"`` is ``name`` (``gm`` already rewritten). It raises ``ModuleModeError`` where the model offers no place
    for the rewrite."""

    def deco(fn: ModuleRewrite) -> ModuleRewrite:
        _MODULE_REWRITES[name] = fn
        return fn

    return deco


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _slot(owner: nn.Module, name: str) -> dict | None:
    """The table of ``owner`` that holds ``name`` (modules, parameters, buffers, plain attributes)."""
    for table in (owner._modules, owner._parameters, owner._buffers, owner.__dict__):
        if name in table:
            return table
    return None


class WriteBack(PassBase):
    """Write the pruned ``gm`` back into ``target`` (a copy of the model ``gm`` was traced from); see the module
    docstring.

    Args:
        target: the copy; its leaf modules are ``gm``'s (shrunk in place).
        plan: the composed plan (its rewrites are translated).
        example_inputs: the tuple the graph was shrunk with (``ensures`` runs both on it).
        call_target: ``call_target(model, inputs)`` runs the model (keyword inputs bind by name).
        retrace: ``retrace(model) -> GraphModule`` traces the result again when it differs (names the node).
    """

    def __init__(self, target: nn.Module, plan: Plan, example_inputs: Sequence[Any],
                 call_target: Callable[[nn.Module, tuple], Any],
                 retrace: Callable[[nn.Module], fx.GraphModule], atol: float = 1e-4, rtol: float = 1e-4) -> None:
        self.target, self.plan = target, plan
        self.example_inputs = tuple(example_inputs)
        self.call_target, self.retrace = call_target, retrace
        self.atol, self.rtol = atol, rtol
        self.claims: list[Claim] = []
        self.updates: dict[tuple[str, str], int] = {}
        self.writes: list[tuple[str, Any]] = []

    def requires(self, gm: fx.GraphModule) -> None:
        traced = gm.meta.get(TRACED)
        if not isinstance(traced, Traced):
            raise ModuleModeError("internal error: the graph carries no snapshot from before the stages")
        record_shapes(gm, self.example_inputs)  # sizes read off shrunk tensors
        for entry in self.plan.rewrites:
            fn = _MODULE_REWRITES.get(entry.get("pass"))
            if fn is not None:
                self.claims.append(fn(gm, entry, self.target))
        claimed = {n for c in self.claims for n in c.nodes}
        alias = {k: v for c in self.claims for k, v in c.alias.items()}
        self.updates = explain(gm, traced, self.target, claimed, alias)
        self.writes = self._writes(gm, traced, {p for c in self.claims for p in c.paths})

    def _writes(self, gm: fx.GraphModule, traced: Traced, claimed: set[str]) -> list[tuple[str, Any]]:
        """(qualified name, new value) of every module and tensor the stages replaced on ``gm``."""
        out: list[tuple[str, Any]] = []
        replaced: set[str] = set(claimed)
        for path, module in gm.named_modules(remove_duplicate=False):
            if not path or _under(path, replaced) or traced.same_module(path, module):
                continue
            if path not in traced.modules and type(module) is nn.Module:
                continue  # a container torch.fx made for a new tensor path: its tensors are written below
            if path not in traced.modules:
                raise refusal(None, f"a rewrite added module '{path}' ({type(module).__name__}), which has no place "
                                    f"in the model's module tree")
            out.append((path, module))
            replaced.add(path)
        for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            if not _under(name, replaced) and not traced.same_tensor(name, t):
                out.append((name, t))
        return out

    def call(self, gm: fx.GraphModule) -> PassResult:
        swaps: dict[int, tuple[Any, Any]] = {}
        for name, new in self.writes:
            prefix, _, leaf = name.rpartition(".")
            try:
                owner = self.target.get_submodule(prefix)
            except AttributeError as exc:
                raise refusal(None, f"the plan changed '{name}', which is not an attribute of the model's modules "
                                    f"(a tensor the forward creates itself)") from exc
            table = _slot(owner, leaf)
            if table is None:
                raise refusal(None, f"the plan changed '{name}', which the model does not hold")
            old = table[leaf]
            if old is not new:
                swaps[id(old)] = (old, new)
                table[leaf] = new
        self._swap_everywhere(swaps)
        for (path, attr), value in self.updates.items():
            module = self.target.get_submodule(path)
            log.debug("module mode: %s.%s = %d (was %d)", path or type(module).__name__, attr, value,
                      getattr(module, attr))
            setattr(module, attr, value)
        for claim in self.claims:
            if claim.apply is not None:
                claim.apply(self.target)
        return PassResult(gm, True)

    def _swap_everywhere(self, swaps: dict[int, tuple[Any, Any]]) -> None:
        """Replace every other occurrence of a replaced object in the copy (tied weights, shared modules)."""
        if not swaps:
            return
        for m in list(self.target.modules()):
            for table in (m._modules, m._parameters, m._buffers):
                for k, v in list(table.items()):
                    hit = swaps.get(id(v))
                    if hit is not None and hit[0] is v:
                        table[k] = hit[1]

    def ensures(self, gm: fx.GraphModule) -> None:
        with eval_no_grad(gm, self.target):
            want = tensors_of(gm(*self.example_inputs))
            got = tensors_of(self.call_target(self.target, self.example_inputs))
        problem = _compare(want, got, self.atol, self.rtol)
        if problem is None:
            return
        raise ModuleModeError(f"output='module': the model's own forward does not compute what the pruned graph "
                              f"computes ({problem}); {self._divergence(gm)}. output='graph' (the default) works")

    def _divergence(self, gm: fx.GraphModule) -> str:
        """The first node whose recorded shape differs between ``gm`` and a re-trace of the result."""
        try:
            again = self.retrace(self.target)
            record_shapes(again, self.example_inputs)
        except Exception as exc:  # the result may not even run: that names the node
            return f"re-tracing the result fails: {exc}"
        mine = {n.name: n for n in gm.graph.nodes}
        for node in again.graph.nodes:
            ref = mine.get(node.name)
            if ref is not None and isinstance(spec_of(node), TensorSpec) and spec_of(node) != spec_of(ref):
                return (f"the first difference is {node.format_node()} at {source_of(node)}: shape "
                        f"{tuple(spec_of(node).shape)}, the plan needs {tuple(spec_of(ref).shape)}")
        return "every node has the shape the plan predicts, so a constant the forward computes differs"


def to_module(gm: fx.GraphModule, target: nn.Module, plan: Plan, inputs: tuple, bind: Any,
              leaf_modules: Sequence[str] = (), layout: HfLayout | None = None) -> nn.Module:
    """Write the pruned ``gm`` (traced from ``target`` with ``output="module"``, or a module-mode replay) back into
    ``target`` (``WriteBack``) and update a Hugging Face ``config`` (``layout``: ``hf_layout`` of ``target`` before
    pruning); returns ``target``."""
    WriteBack(target, plan, inputs, call_target=lambda m, xs: call_with(m, bind, xs),
              retrace=lambda m: trace(m, leaf_modules, example_inputs=bind, stack_traces=True))(gm)
    update_hf_config(target, layout)
    return target


def _compare(want: list[torch.Tensor], got: list[torch.Tensor], atol: float, rtol: float) -> str | None:
    if len(want) != len(got):
        return f"{len(got)} output tensors, the graph returns {len(want)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if w.shape != g.shape:
            return f"output {i} has shape {tuple(g.shape)}, the graph's {tuple(w.shape)}"
        scale = max(1.0, float(w.abs().max())) if w.numel() and w.is_floating_point() else 1.0
        if not torch.allclose(g, w, atol=atol * scale, rtol=rtol, equal_nan=True):
            return f"output {i} differs by up to {float((g - w).abs().max()):.3g}"
    return None


__all__ = ["WriteBack", "to_module", "Claim", "register_module_rewrite", "TRACED", "MODULE_OPTIONS"]
