"""Example inputs as the tuple every entry point passes on."""
from __future__ import annotations

from typing import Any

import torch

from .errors import ExampleInputsError


def as_input_tuple(example_inputs: Any) -> tuple:
    """``example_inputs`` as a tuple in graph-input order: a tensor becomes a 1-tuple, a dict of keyword inputs its
    values; anything else must be a tuple or list."""
    if isinstance(example_inputs, dict):
        return tuple(example_inputs.values())
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ExampleInputsError(f"example_inputs must be a tensor or a tuple of inputs (or a dict of keyword inputs), "
                             f"got {type(example_inputs).__name__}")


def call_with(model: Any, bind: Any, inputs: tuple | None = None) -> Any:
    """``model`` called as the user calls it with ``bind`` (the example inputs as given): by keyword for a dict,
    else positionally. ``inputs`` replaces the values (in ``bind``'s order)."""
    values = as_input_tuple(bind) if inputs is None else tuple(inputs)
    if isinstance(bind, dict):
        return model(**dict(zip(bind, values)))
    return model(*values)


def input_specs(bind: Any) -> list[dict]:
    """Shapes and dtypes (and names, for keyword inputs) of the example inputs, as ``fxprune.save`` stores them."""
    names = list(bind) if isinstance(bind, dict) else None
    specs = [{"shape": list(t.shape), "dtype": str(t.dtype)} for t in as_input_tuple(bind)
             if isinstance(t, torch.Tensor)]
    if names is not None and len(names) == len(specs):
        for spec, name in zip(specs, names):
            spec["name"] = name
    return specs


__all__ = ["as_input_tuple", "call_with", "input_specs"]
