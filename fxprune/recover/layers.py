"""The layers recovery works on: every Conv / Linear module of the pruned graph that reads removed channels.

A *consumer* is a ``call_module`` node of an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (standard ``forward``) whose
input-channel parameter axis (``@path:0:1``) the plan shrinks. Its plan indices refer to the dense model, whose
module at the same path computes the reference activations. Consumers are listed in the pruned graph's
topological order, each with a *level*: 1 + the highest level of the consumers upstream of any of its calls, so
every consumer of level ``k`` only depends on consumers of levels ``< k`` (sequential reconstruction).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import fx, nn

from ..plan import Plan

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Consumer:
    """A layer that reads removed channels. Indices refer to the dense model's channels."""

    path: str
    kind: str  # "linear" or "conv"
    nodes: list[str]  # its call_module nodes in the pruned graph, in execution order
    kept_in: np.ndarray
    removed_in: np.ndarray
    kept_out: np.ndarray
    groups: int = 1  # of the pruned conv
    level: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.nodes)


def layer_kind(m: nn.Module) -> str | None:
    """``"linear"`` / ``"conv"`` for modules whose computation recovery models exactly, else ``None``."""
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return "linear"
    for cls in _CONVS:
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return "conv"
    return None


def _indices(plan: Plan, key: str, size: int) -> np.ndarray:
    kept = plan.kept.get(key)
    return np.arange(size, dtype=np.int64) if kept is None else np.asarray(kept, np.int64)


def find_consumers(dense: nn.Module, pruned: fx.GraphModule, plan: Plan) -> list[Consumer]:
    """The consumers of ``plan`` in ``pruned``, in topological order, with their levels."""
    by_path: dict[str, Consumer] = {}
    reach: dict[str, int] = {}  # node -> highest consumer level at or upstream of it
    for node in pruned.graph.nodes:
        upstream = max((reach.get(i.name, 0) for i in node.all_input_nodes), default=0)
        reach[node.name] = upstream
        if node.op != "call_module":
            continue
        path = str(node.target)
        key = f"@{path}:0:1"
        if key not in plan.kept:
            continue
        m = pruned.get_submodule(path)
        kind = layer_kind(m)
        if kind is None:
            continue
        c = by_path.get(path)
        if c is None:
            d = dense.get_submodule(path)
            n_in = d.in_features if kind == "linear" else d.in_channels
            n_out = d.out_features if kind == "linear" else d.out_channels
            kept_in = _indices(plan, key, n_in)
            c = Consumer(path, kind, [], kept_in, np.setdiff1d(np.arange(n_in), kept_in),
                         _indices(plan, f"@{path}:0:0", n_out), groups=getattr(m, "groups", 1))
            by_path[path] = c
        c.nodes.append(node.name)
        c.level = max(c.level, upstream + 1)
        reach[node.name] = max(upstream, c.level)
    return list(by_path.values())


def bands(consumers: list[Consumer], passes: int) -> list[list[Consumer]]:
    """Consumers split into at most ``passes`` groups of consecutive levels (``passes <= 0``: one per level)."""
    if not consumers:
        return []
    top = max(c.level for c in consumers)
    n = top if passes <= 0 else min(passes, top)
    out: list[list[Consumer]] = [[] for _ in range(n)]
    for c in consumers:
        out[(c.level - 1) * n // top].append(c)
    return [b for b in out if b]


__all__ = ["Consumer", "bands", "find_consumers", "layer_kind"]
