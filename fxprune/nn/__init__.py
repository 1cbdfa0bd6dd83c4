"""fxprune.nn: drop-in modules produced by the pruning passes."""

from fxprune.nn.attention import PrunedMultiheadAttention
from fxprune.nn.blocksparse_linear import BlockSparseLinear
from fxprune.nn.gating import PrunedSpatialGatingUnit
from fxprune.nn.std_conv import PinnedStdConv2d

__all__ = ["BlockSparseLinear", "PinnedStdConv2d", "PrunedMultiheadAttention", "PrunedSpatialGatingUnit"]
