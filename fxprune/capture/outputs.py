"""Structured model outputs: ``ModelOutput`` dataclasses, dicts, lists and nested tuples.

The traced graph returns a flat tuple of the output's leaves (what the analysis freezes as model outputs); the
generated ``forward`` rebuilds the original structure with ``torch.utils._pytree``, so the pruned model returns
what the original returns. A plain tensor or a flat tuple of tensors keeps torch.fx's own code generation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo


def _register_dataclasses(value: Any) -> None:
    """Register plain dataclass types found in ``value`` as pytree nodes (fields in order)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value) not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(type(value))
    if isinstance(value, dict) or type(value) in pytree.SUPPORTED_NODES:
        for child in pytree.tree_flatten(value, is_leaf=lambda v: v is not value)[0]:
            _register_dataclasses(child)


def flatten_output(value: Any) -> tuple[Any, pytree.TreeSpec | None]:
    """``(graph output, spec)``: the value itself and ``None`` when it is a tensor, proxy or flat tuple of them
    (torch.fx handles those); otherwise the flat tuple of leaves and the spec that rebuilds the structure."""
    if isinstance(value, (torch.Tensor, fx.Proxy)) or value is None:
        return value, None
    if type(value) is tuple and all(isinstance(v, (torch.Tensor, fx.Proxy)) for v in value):
        return value, None
    _register_dataclasses(value)
    leaves, spec = pytree.tree_flatten(value)
    return tuple(leaves), spec


class StructuredOutputCodeGen(_PyTreeCodeGen):
    """Code generation that keeps torch.fx's plain signature and rebuilds the output from ``self._out_spec``."""

    def __init__(self, out_spec: pytree.TreeSpec) -> None:
        super().__init__(_PyTreeInfo([], None, out_spec))

    def process_inputs(self, *inputs: Any) -> Any:
        return list(inputs)

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        return fx.graph.CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)


def attach_structure(graph: fx.Graph, spec: pytree.TreeSpec | None) -> None:
    """Make ``graph``'s generated code return ``spec``'s structure (no-op for ``None``)."""
    if spec is not None:
        graph.set_codegen(StructuredOutputCodeGen(spec))


def output_structure(value: Any) -> Any:
    """The container structure of an output (types, keys, leaf kinds), for comparing two models' outputs."""
    _register_dataclasses(value)
    leaves, spec = pytree.tree_flatten(value)
    return spec, [("tensor", t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in leaves]
