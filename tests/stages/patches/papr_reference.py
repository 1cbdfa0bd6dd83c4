"""Independent references for the PaPr tests: a tiny proposal ConvNet and the patch selection written out from the
paper's description (argsort of the bicubically resized channel mean), sharing no code with fxprune.stages.patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyProposal(nn.Module):
    """Two stride-2 convs: a (B, 8, H/4, W/4) map, so a 32x32 image gives an 8x8 significance map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def reference_order(proposal: nn.Module, image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch indices (0-based over the grid) by significance, most significant first: ``argsort(P, descending)``."""
    with torch.no_grad():
        p = proposal.eval()(image).mean(dim=1, keepdim=True)
        p = F.interpolate(p, size=grid, mode="bicubic", align_corners=True)
    return torch.argsort(p.flatten(1), dim=1, descending=True)


def reference_token_indices(proposal: nn.Module, image: torch.Tensor, grid: tuple[int, int], z: float,
                            prefix: int = 1) -> torch.Tensor:
    """PaPr's ``[0] + (argsort(P, descending)[:k - 1] + 1)`` with ``k = int(N * z)``, N counting the class token;
    with ``prefix`` leading tokens (class, distillation, registers) all of them are kept in front."""
    k = int((grid[0] * grid[1] + prefix) * z)
    order = reference_order(proposal, image, grid)[:, : k - prefix] + prefix
    return torch.cat([torch.arange(prefix).expand(len(image), prefix), order], dim=1)


def take(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tokens[b, idx[b]]`` by advanced indexing (the pass uses ``gather``)."""
    return tokens[torch.arange(len(tokens)).unsqueeze(1), idx]
