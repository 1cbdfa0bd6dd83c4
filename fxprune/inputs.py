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


__all__ = ["as_input_tuple"]
