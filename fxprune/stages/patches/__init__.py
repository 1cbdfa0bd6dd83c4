"""PaPr patch pruning (arXiv 2403.16020): a light proposal ConvNet picks the image patches a ViT keeps.

* ``kind: "patches"`` recipe stage (``PatchStage``): ``keep``, ``proposal``, ``where``, ``attention``.
* ``register_proposal(name, module_or_factory)``: make a (trained) proposal network usable by name in recipes.
* the rewrite itself is ``gather.GatherPatches`` (registered as the ``patches`` plan rewrite); where it goes is
  found by ``locate``; ``attention: "gathered"`` fuses the gather into the first attention (``fuse_attention``).
"""
from . import module  # noqa: F401  (registers the module-mode form of the rewrite)
from .proposal import DEFAULT_PROPOSAL, UnknownProposal, build_proposal, register_proposal, registered_proposals
from .select import PatchSignificance, gather_positions, gather_tokens, keep_count, scatter_positions, select_tokens
from .stage import PatchStage

__all__ = ["PatchStage", "register_proposal", "registered_proposals", "build_proposal", "UnknownProposal",
           "DEFAULT_PROPOSAL", "PatchSignificance", "select_tokens", "gather_tokens", "gather_positions",
           "scatter_positions", "keep_count"]
