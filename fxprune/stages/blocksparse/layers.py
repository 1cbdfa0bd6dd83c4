"""Which ``nn.Linear`` layers a ``blocksparse`` stage prunes, and what one block of each costs.

Default: every linear layer whose weight the block tiles, minus the *output layers* (those whose result reaches
the graph's output without crossing another linear layer: the classifier head). ``modules`` patterns choose
layers explicitly (the head included, if named); ``ignore`` patterns always win.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ...errors import RecipeError
from ...ir.spec import TensorSpec, spec_of

log = logging.getLogger(__name__)


@dataclass
class LinearLayer:
    """One prunable linear layer: module path, weight shape, block grid, and tokens it processes per forward."""

    path: str
    module: nn.Linear
    nodes: list[fx.Node]
    block: tuple[int, int]
    tokens: int

    @property
    def grid(self) -> tuple[int, int]:
        """``(block rows, block columns)`` of the weight."""
        return self.module.out_features // self.block[0], self.module.in_features // self.block[1]

    @property
    def n_blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def block_macs(self) -> int:
        """MACs one block costs per forward of the example inputs (tokens x BN x BK)."""
        return self.tokens * self.block[0] * self.block[1]

    @property
    def block_params(self) -> int:
        return self.block[0] * self.block[1]


def is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear``, or a subclass that keeps its forward (e.g. ``NonDynamicallyQuantizableLinear``)."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _tokens(node: fx.Node) -> int:
    spec = spec_of(node)
    if not isinstance(spec, TensorSpec):
        raise RecipeError("modules", f"no recorded shape for {node.format_node()} (record_shapes first)")
    return math.prod(spec.shape[:-1])


def output_layers(gm: fx.GraphModule) -> set[str]:
    """Paths of linear layers whose output reaches the graph output through no other linear layer."""
    found: set[str] = set()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    stack, seen = list(out.all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            found.add(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return found


def select_layers(gm: fx.GraphModule, block: tuple[int, int], modules: list[str],
                  ignore: list[str]) -> list[LinearLayer]:
    """The layers to prune, in graph order. Raises ``RecipeError`` naming the module when an explicitly chosen
    layer is not tiled by ``block``, or when a ``modules`` pattern matches no linear layer."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_linear(gm.get_submodule(node.target)):
            calls.setdefault(node.target, []).append(node)
    for p in modules:
        if not any(fnmatch.fnmatchcase(path, p) for path in calls):
            raise RecipeError("modules", f"pattern '{p}' matches no nn.Linear layer; linear layers: "
                                         f"{', '.join(list(calls)[:8])}{' ...' if len(calls) > 8 else ''}")
    heads = output_layers(gm) if not modules else set()
    bn, bk = block
    layers = []
    for path, nodes in calls.items():
        if _matches(path, ignore) or (modules and not _matches(path, modules)) or path in heads:
            continue
        m = gm.get_submodule(path)
        if m.out_features % bn or m.in_features % bk:
            if modules:
                raise RecipeError("block", f"block {bn}x{bk} does not tile module '{path}' (weight "
                                           f"{m.out_features}x{m.in_features}): {nodes[0].format_node()}")
            log.info("blocksparse: %s (%dx%d) is not tiled by %dx%d blocks; left dense", path, m.out_features,
                     m.in_features, bn, bk)
            continue
        layers.append(LinearLayer(path, m, nodes, (bn, bk), sum(_tokens(n) for n in nodes)))
    if not layers:
        raise RecipeError("modules", f"no nn.Linear layer to prune: none is tiled by {bn}x{bk} blocks outside the "
                                     f"output layers ({', '.join(sorted(heads)) or 'none'}) and 'ignore'")
    return layers
