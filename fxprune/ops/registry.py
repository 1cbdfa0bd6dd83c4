"""The op-rule registry: one rule per op family, looked up by module type, function or method name.

A rule tells the analysis how the channels of a node's inputs, outputs and parameters are coupled
(``couple``), shrinks what it owns when channels are removed (``shrink_module``, ``rewrite_node``), exposes the
parameter slices each channel owns to the criteria (``param_slices``) and counts work (``macs``, ``param_count``).
Criteria never look at op types: they only read ``param_slices``.

Example:
    >>> @register_op(torch.nn.Hardtanh)
    ... class MyRule(OpRule): ...
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import Port, Space

log = logging.getLogger(__name__)

#: roles of parameter slices: "weight" (rows producing a channel), "weight_in" (columns reading a channel),
#: "bias", "scale" (norm gamma), "shift" (norm beta), "stat" (running statistics), "attr" (a free tensor).
ROLES = ("weight", "weight_in", "bias", "scale", "shift", "stat", "attr")


class OpRule:
    """Base rule: an op fxprune does not understand. Every channel it touches is frozen."""

    name = "unsupported"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        """State ties / frees between the node's tensors and parameter axes. Uncovered slots are frozen."""

    def scope(self, node: fx.Node, c: Coupling) -> list[Port]:
        """The tensors whose every slot this rule must cover: inputs read and outputs produced."""
        return c.ports(list(node.all_input_nodes)) + c.ports(node)

    def frozen_reason(self, node: fx.Node, space: Space) -> str:
        """Why slots of ``space`` that this rule does not cover are frozen."""
        if self.name == "unsupported":
            return f"unsupported op: {node.format_node()}"
        return f"{self.name} cannot shrink dim {space.dim} of '{space.owner}': {node.format_node()}"

    def rewrite_node(self, node: fx.Node, r: RewriteContext) -> None:
        """Rewrite graph constants (sizes, indices) of ``node`` for the shrunk shapes."""

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        """Slice the parameters, buffers and attributes of the module (or tensor attribute) at ``path``."""

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        """For each index of a parameter axis, the values that channel owns: ``[(role, Tensor[len(idx), -1])]``."""
        return []

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        """Multiply-accumulates of the node at the (possibly shrunk) sizes of ``s``."""
        return 0

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        """Parameters of the module at ``path`` at the shrunk sizes of ``s``."""
        return sum(p.numel() for p in gm.get_submodule(path).parameters(recurse=False))

    def head_spaces(self, node: fx.Node) -> list[Space]:
        """The spaces of ``node`` whose slots are whole attention heads (the ``heads`` stage prunes their groups)."""
        return []

    def head_dim_spaces(self, node: fx.Node) -> list[Space]:
        """The per-head feature dims of ``node``'s queries/keys and values (pruned by the ``head_dim`` stage)."""
        return []


_MODULES: dict[type, OpRule] = {}
_FUNCTIONS: dict[Any, OpRule] = {}
_METHODS: dict[str, OpRule] = {}
_FX_OPS: dict[str, OpRule] = {}
UNSUPPORTED = OpRule()


def register_op(*targets: Any, fx_op: str | None = None) -> Callable[[type[OpRule]], type[OpRule]]:
    """Class decorator: register one rule instance for module types, functions and method names (strings).

    ``fx_op`` registers a rule for a node kind (``placeholder``, ``get_attr``, ``output``).
    """

    def deco(cls: type[OpRule]) -> type[OpRule]:
        rule = cls()
        if fx_op is not None:
            _FX_OPS[fx_op] = rule
        for t in targets:
            if isinstance(t, str):
                _METHODS[t] = rule
            elif isinstance(t, type) and issubclass(t, nn.Module):
                _MODULES[t] = rule
            else:
                _FUNCTIONS[t] = rule
        return cls

    return deco


def register_functions(rule_cls: type[OpRule], targets: Iterable[Any]) -> None:
    """Register more targets for an already registered rule class (e.g. optional third-party functions)."""
    known = [*_FUNCTIONS.values(), *_MODULES.values(), *_METHODS.values()]
    rule = next((r for r in known if type(r) is rule_cls), rule_cls())
    for t in targets:
        if isinstance(t, str):
            _METHODS[t] = rule
        elif isinstance(t, type):
            _MODULES[t] = rule
        else:
            _FUNCTIONS[t] = rule


_INSTALLED: set[tuple[str, type]] = set()


def register_installed(module: str, names: Sequence[str], rule_cls: type[OpRule]) -> None:
    """Register ``rule_cls`` for the classes ``names`` that ``module`` of the installed package has, once, and only
    once the package (``module``'s first part) is imported: fxprune never imports timm or transformers itself."""
    key = (module, rule_cls)
    if key in _INSTALLED or module.split(".")[0] not in sys.modules:
        return
    _INSTALLED.add(key)
    try:
        found = importlib.import_module(module)
    except ImportError:  # a version without that module
        return
    types = [getattr(found, n) for n in names if isinstance(getattr(found, n, None), type)]
    if types:
        register_op(*types)(rule_cls)


def module_rule(m: nn.Module) -> OpRule | None:
    """The rule of a module: its exact type, or a registered base whose ``forward`` it does not override."""
    rule = _MODULES.get(type(m))
    if rule is not None:
        return rule
    for base in type(m).__mro__[1:]:
        if base in _MODULES and type(m).forward is base.forward:
            return _MODULES[base]
    return None


def has_module_rule(m: nn.Module) -> bool:
    return module_rule(m) is not None


def lookup(node: fx.Node, gm: fx.GraphModule) -> OpRule:
    """The rule for a node; ``UNSUPPORTED`` when none is registered."""
    if node.op in _FX_OPS:
        return _FX_OPS[node.op]
    if node.op == "call_module":
        return module_rule(gm.get_submodule(node.target)) or UNSUPPORTED
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target, UNSUPPORTED)
        except TypeError:  # unhashable target
            return UNSUPPORTED
    if node.op == "call_method":
        return _METHODS.get(node.target, UNSUPPORTED)
    return UNSUPPORTED


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
