"""Counting work: multiply-accumulates (MACs) and parameters, at original or shrunk sizes.

Only ops whose rules define ``macs`` count (convolutions, linear layers, matmuls); elementwise ops, norms and
pooling are left out, as in most published FLOPs figures.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .ops.registry import OpRule
from .passes.context import SizeContext
from .graph.space import Space

if TYPE_CHECKING:
    from .graph.dependency import Analysis


class Counter:
    """MACs and parameters of an analysed graph for any set of shrunk sizes."""

    def __init__(self, analysis: "Analysis") -> None:
        self.a = analysis
        gm = analysis.gm
        self.mac_nodes = [(n, analysis.node_rules[n.name]) for n in gm.graph.nodes
                          if type(analysis.node_rules[n.name]).macs is not OpRule.macs]
        self.owners = sorted({s.owner for s in analysis.param_sizes})
        self.total_params = sum(p.numel() for p in gm.parameters())
        base = SizeContext({}, analysis.param_sizes)
        self.base_owner_params = self._owner_params(base)
        self.base_macs = self._macs(base)

    def _owner_params(self, s: SizeContext) -> int:
        return sum(self.a.param_rules[o].param_count(self.a.gm, o[1:], s) for o in self.owners)

    def _macs(self, s: SizeContext) -> int:
        return sum(rule.macs(node, s) for node, rule in self.mac_nodes)

    def count(self, new_sizes: dict[Space, int]) -> dict[str, int]:
        s = SizeContext(new_sizes, self.a.param_sizes)
        return {"macs": self._macs(s), "params": self.total_params - self.base_owner_params + self._owner_params(s)}

    def reduction(self, new_sizes: dict[Space, int], metric: str) -> float:
        """Fraction of ``metric`` ("macs" or "params") removed at ``new_sizes``."""
        now = self.count(new_sizes)[metric]
        base = self.base_macs if metric == "macs" else self.total_params
        return 1.0 - now / base if base else 0.0


def count_work(model: "torch.nn.Module", *inputs: "torch.Tensor") -> dict[str, int]:
    """MACs and parameters of any traceable model on ``inputs`` (the model is not modified; a ``torch.compile`` or
    ``DataParallel`` wrapper is looked through)."""
    import copy

    from .trace import record_shapes, trace, unwrap

    # Trace a copy: tracing runs forward code, and some models cache what it computes (timm LeViT caches its
    # attention biases per device), which would leave proxies in the user's model. A torch.compile'd or
    # DataParallel model is counted by the module it wraps.
    gm = trace(copy.deepcopy(unwrap(model)[0]), example_inputs=inputs)
    record_shapes(gm, inputs)
    return count_model(gm)


def count_model(gm: fx.GraphModule) -> dict[str, int]:
    """MACs and parameters of a traced module whose nodes carry recorded shapes."""
    from .graph.dependency import analyze

    return Counter(analyze(gm)).count({})
