"""Binding a model's ``forward`` signature to the example inputs.

The traced root takes exactly the example inputs: positional inputs bind to the first positional parameters (or
to ``*args``), a dict binds by keyword. Every other parameter keeps its default and is seen by the model's code as
a plain Python value, so ``*args``/``**kwargs`` forwards, decorators that rebuild keyword arguments and flags such
as ``return_dict`` run as ordinary Python.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..defaults import forward_parameters, plain_signature
from ..errors import ExampleInputsError


@dataclass(frozen=True)
class BoundInputs:
    """The example inputs bound to ``forward``: one name per graph input, and how each is passed."""

    names: tuple[str, ...]  # placeholder names, in graph-input order
    values: tuple[Any, ...]  # the example values, same order
    n_positional: int  # the first ``n_positional`` are passed positionally, the rest by keyword
    keywords: tuple[str, ...]  # the forward's keyword of each keyword input

    def call(self, forward: Callable[..., Any], module: nn.Module, args: tuple) -> Any:
        """Call ``forward(module, ...)`` with ``args`` (one per input) passed as the example inputs were."""
        pos, kw = args[:self.n_positional], args[self.n_positional:]
        return forward(module, *pos, **dict(zip(self.keywords, kw)))


def _identifier(name: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "input"
    if base[0].isdigit():
        base = f"input_{base}"
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def bind_inputs(model: nn.Module, example_inputs: Any) -> BoundInputs:
    """Bind ``example_inputs`` (a tensor, a tuple/list of inputs or a dict of keyword inputs) to
    ``model.forward``'s parameters.

    Raises ``ExampleInputsError`` naming the parameter when the inputs do not fit the signature.
    """
    found = forward_parameters(model)
    params = found or []
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    taken: set[str] = set()
    if isinstance(example_inputs, dict):
        known = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key in example_inputs:
            if not isinstance(key, str):
                raise ExampleInputsError(f"example_inputs dict keys must be argument names, got {key!r}")
            if found is not None and key not in known and not var_kw:
                raise ExampleInputsError(f"example_inputs names '{key}', which {type(model).__name__}.forward does "
                                         f"not take (its parameters: {', '.join(p.name for p in params)})")
        names = tuple(_identifier(k, taken) for k in example_inputs)
        return BoundInputs(names, tuple(example_inputs.values()), 0, tuple(example_inputs))
    values = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    names_list: list[str] = []
    for i in range(len(values)):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
            names_list.append(_identifier(params[i].name, taken))
        elif found is None or any(p.kind is p.VAR_POSITIONAL for p in params[:i + 1]):
            names_list.append(_identifier(f"args_{i}", taken))
        else:
            raise ExampleInputsError(f"{type(model).__name__}.forward takes at most {i} positional inputs "
                                     f"({', '.join(p.name for p in params[:i])}) but example_inputs has "
                                     f"{len(values)}; pass keyword inputs as a dict")
    return BoundInputs(tuple(names_list), values, len(values), ())


__all__ = ["BoundInputs", "bind_inputs", "plain_signature"]
