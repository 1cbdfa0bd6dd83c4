"""fxprune.nn: drop-in modules produced by the pruning passes."""

from fxprune.nn.attention import PrunedMultiheadAttention
from fxprune.nn.blocksparse_linear import BlockSparseLinear

__all__ = ["BlockSparseLinear", "PrunedMultiheadAttention"]
