"""The ``patches`` recipe stage: PaPr patch pruning (arXiv 2403.16020).

Example:
    >>> recipe = {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "torchvision:mobilenet_v3_small"}]}
    >>> pruned = fxprune.compile(torchvision.models.vit_b_16(), recipe, example_inputs=torch.randn(1, 3, 224, 224))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from ...criteria import ScoreContext
from ...errors import RecipeError
from ...plan import Plan
from ..base import Stage, register_stage
from .gather import gather_patches
from .proposal import DEFAULT_PROPOSAL, UnknownProposal, check_proposal_name, check_proposal_weights

WHERE = ("auto", "pos_embed", "mlp")
ATTENTION = ("sdpa", "gathered")


@register_stage("patches")
@dataclass
class PatchStage(Stage):
    """Keep only the most significant image patches, as a light proposal ConvNet ranks them (one step, per image).

    Fields:
        keep: the kept fraction ``z`` in (0, 1]. ViTs keep ``int(N * z)`` tokens, ``N`` counting the class token
            (always kept); hierarchical models run each MLP on ``int(H * W * z)`` positions of its stage's grid.
        proposal: ``"torchvision:<model>"`` (built with ``weights=None``, cut before global pooling) or a name
            registered with ``fxprune.stages.patches.register_proposal`` (e.g. a trained module).
        proposal_weights: ``None`` (as built or registered), a torchvision weights name for a ``torchvision:``
            proposal (``"DEFAULT"``, ``"IMAGENET1K_V1"``; torchvision fetches them once and caches them), or a
            state-dict file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``) of the proposal or of the whole
            torchvision classifier. The weights end up in the pruned model's state dict, so ``fxprune.load`` needs
            neither the file nor the network.
        where: ``auto`` (ViT: after the position embedding; else the channels-last MLPs of Swin / ConvNeXt),
            ``pos_embed``, ``mlp``, or the name of the graph node whose ``(B, N, D)`` output is gathered.
        attention: ``sdpa`` (default: every block runs unchanged on the kept tokens) or ``gathered`` (ViTs with
            timm-style attention: the first block reads its packed qkv by index with the ``gathered_attention``
            kernel, see ``fxprune.stages.patches.fuse_attention``).
    """

    keep: float = 0.5
    proposal: str = DEFAULT_PROPOSAL
    proposal_weights: str | None = None
    where: str = "auto"
    attention: str = "sdpa"
    rewrites_graph: ClassVar[bool] = True

    def validate(self, path: str) -> None:
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise RecipeError(f"{path}.keep", f"must be a fraction in (0, 1], got {k!r}")
        if not isinstance(self.proposal, str) or not self.proposal:
            raise RecipeError(f"{path}.proposal", f"must be a proposal name, got {self.proposal!r}")
        try:
            check_proposal_name(self.proposal)
        except UnknownProposal as exc:
            raise RecipeError(f"{path}.proposal", str(exc)) from exc
        if self.proposal_weights is not None:
            if not isinstance(self.proposal_weights, str) or not self.proposal_weights:
                raise RecipeError(f"{path}.proposal_weights", "must be a torchvision weights name or a state-dict "
                                  f"file path, got {self.proposal_weights!r}")
            try:
                check_proposal_weights(self.proposal, self.proposal_weights)
            except ValueError as exc:
                raise RecipeError(f"{path}.proposal_weights", str(exc)) from exc
        if not isinstance(self.where, str) or not self.where:
            raise RecipeError(f"{path}.where", f"must be one of {', '.join(WHERE)} or a node name, got {self.where!r}")
        if self.attention not in ATTENTION:
            raise RecipeError(f"{path}.attention", f"must be one of {', '.join(ATTENTION)}, got {self.attention!r}")

    def summary(self) -> str:
        return f"{self.kind} keep={float(self.keep):g}"

    def normalized(self) -> PatchStage:
        return dataclasses.replace(self, keep=float(self.keep))

    def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
        """Insert patch selection into ``gm``; the plan records the resolved rewrite for ``fxprune.load``."""
        entry = gather_patches(gm, {"pass": "patches", "keep": float(self.keep), "proposal": self.proposal,
                                    "where": self.where, "attention": self.attention}, ctx.example_inputs,
                               weights=self.proposal_weights)
        return Plan(rewrites=[entry])


__all__ = ["PatchStage"]
