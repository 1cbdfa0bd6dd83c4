"""Block sparsity (LPViT): the ``blocksparse`` stage, its block criteria and the ``BlockSparseLinear`` op rule.

Importing this package registers the stage, its runner, the ``lpvit``/``dimap``/``l2`` block criteria, the
``blocksparse`` plan rewrite and the op rule that counts block-sparse MACs.
"""
from . import criteria, rule, stage  # noqa: F401  (registration)
from ..criteria import lpvit  # noqa: F401  (registers the "lpvit" block criterion)
from . import runner  # noqa: F401  (registers the stage runner; needs fxprune.api)
from .criteria import BlockCosts, get_block_criterion, register_block_criterion
from .stage import BlockSparseStage

__all__ = ["BlockSparseStage", "BlockCosts", "get_block_criterion", "register_block_criterion"]
