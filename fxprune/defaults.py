"""Arguments the example inputs leave out take their defaults as constants while tracing.

``forward(x, mask=None)`` traced by plain torch.fx gets a ``mask`` proxy, so ``if mask is not None:`` takes the
masked branch, which the example run (where ``mask`` is ``None``) cannot execute (timm Hiera). Binding every
parameter after the positional example inputs to its default, through torch.fx's ``concrete_args``, traces the
branch the example run takes; the graph keeps the parameter as an input with that default and asserts it is
passed unchanged.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

#: default values bound as constants (a tensor default stays a graph input)
CONSTANT_TYPES = (type(None), bool, int, float, str)


def unbound_defaults(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """``{name: default}`` for the parameters of ``model.forward`` after the positional ``example_inputs`` (a
    tensor, a tuple or a list) whose default is a constant; ``{}`` for other inputs or a ``*args`` forward."""
    if isinstance(example_inputs, torch.Tensor):
        n = 1
    elif isinstance(example_inputs, (tuple, list)):
        n = len(example_inputs)
    else:
        return {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}
    return {p.name: p.default for p in params[n:]
            if p.default is not p.empty and isinstance(p.default, CONSTANT_TYPES)}


__all__ = ["unbound_defaults"]
