"""Op rule for ``BlockSparseLinear`` so reports and MAC counts see block-sparse layers.

Only the stored blocks count: ``MACs = tokens x nnz_blocks x BN x BK``. Leading (token) dims pass through; the
feature dims are frozen (channel pruning never runs after a block-sparse swap).
"""
from __future__ import annotations

import math

import torch.fx as fx

from ...ir.context import SizeContext
from ...ir.coupling import Coupling
from ...nn.blocksparse_linear import BlockSparseLinear
from ...ops.registry import OpRule, register_op


@register_op(BlockSparseLinear)
class BlockSparseLinearRule(OpRule):
    name = "blocksparse_linear"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = c.port(node.args[0]), c.out()
        if x is None or y is None:
            return
        for d in range(x.ndim - 1):
            c.tie_dims(x, d, y, d)

    def macs(self, node: fx.Node, s: SizeContext) -> int:
        m = node.graph.owning_module.get_submodule(node.target)
        tokens = math.prod(s.shape(node)[:-1])
        return tokens * m.values.shape[0] * m.block_shape[0] * m.block_shape[1]
