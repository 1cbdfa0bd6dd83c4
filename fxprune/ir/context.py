"""Sizes after pruning, as seen by op rules when they count work or rewrite the graph."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from .space import Space
from .spec import TensorSpec, spec_of


class SizeContext:
    """Shapes of the graph's tensors and parameter axes with some spaces shrunk to ``new_sizes``."""

    def __init__(self, new_sizes: dict[Space, int], param_sizes: dict[Space, int]) -> None:
        self.new_sizes = new_sizes
        self.param_sizes = param_sizes

    def shape(self, arg: Any, item: int = 0) -> tuple[int, ...]:
        """The shape of the tensor ``arg`` (a node; item ``item`` of a tuple result) after shrinking."""
        spec = spec_of(arg)
        if isinstance(spec, tuple):
            spec = spec[item]
        if not isinstance(spec, TensorSpec):
            raise TypeError(f"node {arg} does not produce a tensor")
        return tuple(self.new_sizes.get(Space(arg.name, item, d), n) for d, n in enumerate(spec.shape))

    def size(self, space: Space) -> int:
        if space in self.new_sizes:
            return self.new_sizes[space]
        if space in self.param_sizes:
            return self.param_sizes[space]
        raise KeyError(f"unknown space {space.key()}")

    def axis(self, path: str, axis: int) -> int:
        """The size of parameter axis ``axis`` of the module or attribute at ``path``."""
        return self.size(Space("@" + path, 0, axis))


class RewriteContext(SizeContext):
    """Sizes plus the kept indices of every shrunk space; what rules read while rewriting."""

    def __init__(self, kept: dict[Space, np.ndarray], param_sizes: dict[Space, int]) -> None:
        super().__init__({s: len(k) for s, k in kept.items()}, param_sizes)
        self.kept_indices = kept

    def kept(self, space: Space) -> np.ndarray | None:
        """Sorted kept indices of ``space``, or ``None`` when nothing was removed from it."""
        return self.kept_indices.get(space)

    def kept_param(self, path: str, axis: int) -> np.ndarray | None:
        return self.kept(Space("@" + path, 0, axis))

    def touches(self, node: fx.Node) -> bool:
        return any(s.owner == node.name for s in self.kept_indices)
