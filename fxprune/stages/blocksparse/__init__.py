"""Block sparsity (LPViT): the ``blocksparse`` stage with everything only it uses.

* ``stage``: the config (``BlockSparseStage``) and its runner;
* ``layers`` / ``allocate`` / ``latency``: which layers, how many blocks each loses, the measured latency term;
* ``criteria`` (``l2``, ``dimap``) and ``lpvit``: the block criteria, registered by name;
* ``swap``: the ``blocksparse`` plan rewrite (``nn.Linear`` -> ``fxprune.nn.BlockSparseLinear``);
* ``rule``: the op rule that counts a ``BlockSparseLinear``'s MACs.

Importing this package registers all of them.
"""
from . import lpvit, rule
from .criteria import BlockCosts, get_block_criterion, register_block_criterion
from .stage import BlockSparseStage

__all__ = ["BlockSparseStage", "BlockCosts", "get_block_criterion", "register_block_criterion", "lpvit", "rule"]
