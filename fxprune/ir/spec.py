"""Tensor specs: the shape and dtype recorded on every node of a traced graph (``node.meta["fxprune"]``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

#: the ``node.meta`` key under which ``fxprune.trace.record_shapes`` stores a node's spec
META = "fxprune"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor produced by a node."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def spec_of(node: Any) -> Any:
    """The recorded spec of a node: a ``TensorSpec``, a tuple of specs, a plain value, or ``None`` for constants and
    unrecorded nodes."""
    return node.meta.get(META) if isinstance(node, fx.Node) else None


__all__ = ["META", "TensorSpec", "spec_of"]
