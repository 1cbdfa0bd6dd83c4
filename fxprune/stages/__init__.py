"""Stage kinds, one module or subpackage each; importing this package registers every kind.

* ``base``: the ``Stage`` base class, the ``register_stage`` registry and the shared budget fields
  (``RecoveringStage``: the ``recover`` field of ``channels``, ``heads``, ``head_dim`` and ``iterative``);
* ``channels``: remove coupled channel units (and the step loop ``heads`` and ``head_dim`` reuse);
* ``iterative``: channels by a sensitivity-driven schedule with fine-tuning in between;
* ``heads`` / ``head_dim``: whole attention heads / per-head features;
* ``blocksparse/``: LPViT block sparsity of Linear weights; ``patches/``: PaPr patch pruning.
"""
from . import blocksparse, channels, head_dim, heads, iterative, patches
from .base import ChannelPruningStage, PruningStage, RecoveringStage, Stage, register_stage, stage_class, stage_kinds
from .blocksparse import BlockSparseStage
from .channels import ChannelStage
from .head_dim import HeadDimStage
from .heads import HeadStage
from .iterative import IterativeStage
from .patches import PatchStage

__all__ = ["Stage", "PruningStage", "ChannelPruningStage", "RecoveringStage", "register_stage", "stage_class",
           "stage_kinds", "ChannelStage", "IterativeStage", "HeadStage", "HeadDimStage", "BlockSparseStage",
           "PatchStage", "blocksparse", "channels", "head_dim", "heads", "iterative", "patches"]
