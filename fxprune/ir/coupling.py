"""What one op rule says about one node: ties between channel slots, freed slots and frozen slots.

A *tie* says slot ``ia[k]`` of space ``a`` and slot ``ib[k]`` of space ``b`` must be removed together. A *free*
slot may be removed and the rule will cope. Slots of the node's tensors that no tie or free covers are frozen.
A *choice* offers alternative tie sets (e.g. which factor of a reshape carries the channels); the analysis picks
the option whose spaces are least frozen by the rest of the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from .space import Port, Space, arange
from .spec import TensorSpec, spec_of


@dataclass
class Tie:
    a: Space
    ia: np.ndarray
    b: Space
    ib: np.ndarray


@dataclass
class Coupling:
    """Collects the statements of one rule about one node."""

    node: fx.Node
    gm: fx.GraphModule
    ties: list[Tie] = field(default_factory=list)
    freed: list[tuple[Space, np.ndarray | None]] = field(default_factory=list)
    frozen: list[tuple[Space, np.ndarray | None, str]] = field(default_factory=list)
    choices: list[list[list[Tie]]] = field(default_factory=list)
    param_sizes: dict[Space, int] = field(default_factory=dict)
    nodes: dict[str, fx.Node] = field(default_factory=dict)
    #: analysis options rules may read (e.g. ``{"layer_norm": "renormalize"}``); empty by default
    options: dict[str, Any] = field(default_factory=dict)

    # -- reading the node -------------------------------------------------------------------------------------
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    def port(self, arg: Any, item: int | None = None) -> Port | None:
        """The tensor behind an argument (a node producing a tensor, or item ``item`` of a tuple)."""
        if not isinstance(arg, fx.Node):
            return None
        spec = spec_of(arg)
        if item is not None and isinstance(spec, tuple):
            item = item + len(spec) if item < 0 else item  # tuple[-1] is the last item's space
            spec = spec[item] if 0 <= item < len(spec) else None
        else:
            item = 0
        return Port(arg.name, item, spec.shape) if isinstance(spec, TensorSpec) else None

    def out(self, item: int | None = None) -> Port | None:
        return self.port(self.node, item)

    def ports(self, arg: Any) -> list[Port]:
        """Every tensor in an argument that may be a node, a tuple-producing node or a list of nodes."""
        if isinstance(arg, (list, tuple)):
            return [p for a in arg for p in self.ports(a)]
        spec = spec_of(arg)
        if isinstance(spec, tuple):
            return [p for i in range(len(spec)) if (p := self.port(arg, i)) is not None]
        p = self.port(arg)
        return [p] if p is not None else []

    # -- statements ---------------------------------------------------------------------------------------------
    def tie(self, a: Space, b: Space, ia: np.ndarray | None = None, ib: np.ndarray | None = None,
            size: int | None = None) -> None:
        """Tie slots of ``a`` to slots of ``b`` (all slots, identity, when the index arrays are omitted)."""
        if ia is None:
            ia = arange(size if size is not None else self.size(a))
        if ib is None:
            ib = arange(size if size is not None else self.size(b))
        if len(ia) != len(ib):
            raise ValueError(f"tie of unequal lengths {a} {b} at {self.node.format_node()}")
        self.ties.append(Tie(a, np.asarray(ia, np.int64), b, np.asarray(ib, np.int64)))

    def tie_dims(self, x: Port, dx: int, y: Port, dy: int) -> None:
        if x.shape[dx] == y.shape[dy]:
            self.tie(x.space(dx), y.space(dy), size=x.shape[dx])

    def tie_broadcast(self, x: Port, y: Port) -> None:
        """Tie dims of input ``x`` to output ``y`` under broadcasting (aligned from the right, size-1 dims skipped)."""
        offset = y.ndim - x.ndim
        for d in range(x.ndim):
            if x.shape[d] == y.shape[d + offset] and x.shape[d] > 1:
                self.tie(x.space(d), y.space(d + offset), size=x.shape[d])

    def free(self, space: Space, idx: np.ndarray | None = None) -> None:
        self.freed.append((space, idx))

    def freeze(self, space: Space, reason: str, idx: np.ndarray | None = None) -> None:
        self.frozen.append((space, idx, reason))

    def choose(self, options: list[list[Tie]]) -> None:
        """Offer alternative tie sets; exactly one is kept after analysis."""
        options = [o for o in options if o]
        if len(options) == 1:
            self.ties.extend(options[0])
        elif options:
            self.choices.append(options)

    def param(self, axis: int, size: int, target: str | None = None) -> Space:
        """The shared space of a parameter axis of this node's module (or of ``target``)."""
        space = Space("@" + (target or str(self.node.target)), 0, axis)
        self.param_sizes[space] = size
        return space

    def size(self, space: Space) -> int:
        if space in self.param_sizes:
            return self.param_sizes[space]
        port = self.port(self.nodes[space.owner], space.item)
        return port.shape[space.dim]


def make_tie(a: Space, ia: np.ndarray, b: Space, ib: np.ndarray) -> Tie:
    return Tie(a, np.asarray(ia, np.int64), b, np.asarray(ib, np.int64))
