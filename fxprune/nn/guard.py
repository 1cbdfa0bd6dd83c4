"""The input guards a captured graph runs on every call (``fxprune.capture`` writes them): cheap checks of the
shapes, dtypes and values that the traced Python code decided on. They are part of every pruned model such a
graph becomes, hence their home here."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx.node import has_side_effect

from ..errors import FxPruneError


class GuardError(FxPruneError, RuntimeError):
    """A call breaks a fact the pruned graph was traced under (e.g. another input size)."""


@has_side_effect
def check_input(x: Any, name: str, ndim: int | None, dims: tuple, dtype: Any, value: Any, why: tuple) -> None:
    """Raise ``GuardError`` unless input ``x`` has the pinned ``ndim``, ``dims`` (``(dim, size)`` pairs),
    ``dtype`` and (for a non-tensor input) ``value``; ``why[i]`` explains the i-th pin."""
    if isinstance(x, torch.Tensor):
        if ndim is not None and x.ndim != ndim:
            _fail(name, "ndim", ndim, x.ndim, why[0])
        for i, (d, size) in enumerate(dims):
            if x.shape[d] != size:
                _fail(name, f"shape[{d}]", size, x.shape[d], why[1 + i])
        if dtype is not None and x.dtype != dtype:
            _fail(name, "dtype", dtype, x.dtype, why[-2])
    elif value is not None and x != value:
        _fail(name, "value", value, x, why[-1])


def _fail(name: str, item: str, want: Any, got: Any, why: str) -> None:
    raise GuardError(
        f"guard failed: input '{name}' has {item} = {got}, but the model was traced with {item} = {want} and "
        f"{why}. The pruned graph is specialized to the example inputs' {item}; call it with inputs like the "
        f"example_inputs given to fxprune.compile, or compile again with example_inputs of the size you will use.")


__all__ = ["GuardError", "check_input"]
