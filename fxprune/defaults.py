"""Arguments the example inputs leave out take their defaults as constants while tracing.

``forward(x, mask=None)`` traced by plain torch.fx gets a ``mask`` proxy, so ``if mask is not None:`` takes the
masked branch, which the example run (where ``mask`` is ``None``) cannot execute (timm Hiera). Binding every
parameter after the positional example inputs to its default, through torch.fx's ``concrete_args``, traces the
branch the example run takes; the graph keeps the parameter as an input with that default and asserts it is
passed unchanged.

``forward_parameters`` is the one place the forward's signature is read, for this plain-fx path and for the
capture path's binding (``capture/signature.py``).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

#: default values bound as constants (a tensor default stays a graph input)
CONSTANT_TYPES = (type(None), bool, int, float, str)


def forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``model.forward`` (following ``functools.wraps``), or ``None`` when it has no signature."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def has_var_args(params: list[inspect.Parameter]) -> bool:
    """Whether a signature takes ``*args`` or ``**kwargs``."""
    return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def plain_signature(model: nn.Module, example_inputs: Any) -> bool:
    """Whether plain torch.fx tracing binds these inputs as the model expects: positional inputs to a forward
    without ``*args``/``**kwargs``."""
    if isinstance(example_inputs, dict):
        return False
    params = forward_parameters(model)
    return params is not None and not has_var_args(params)


def unbound_defaults(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """``{name: default}`` for the parameters of ``model.forward`` after the positional ``example_inputs`` (a
    tensor, a tuple or a list) whose default is a constant; ``{}`` for other inputs or a ``*args`` forward."""
    if isinstance(example_inputs, torch.Tensor):
        n = 1
    elif isinstance(example_inputs, (tuple, list)):
        n = len(example_inputs)
    else:
        return {}
    params = forward_parameters(model)
    if params is None or has_var_args(params):
        return {}
    return {p.name: p.default for p in params[n:]
            if p.default is not p.empty and isinstance(p.default, CONSTANT_TYPES)}


__all__ = ["forward_parameters", "has_var_args", "plain_signature", "unbound_defaults"]
