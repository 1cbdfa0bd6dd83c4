"""The tensors of PaPr patch selection (arXiv 2403.16020), as a module and plain functions the rewritten graph calls.

* ``PatchSignificance``: proposal features ``(B, C, h, w)`` -> channel mean ``(B, 1, h, w)``, computed without
  gradients; the proposal stays in eval mode whatever mode the pruned model is in.
* ``select_tokens``: the map resized bicubically (``align_corners=True``) to a token grid, the top patches per image,
  with the ``prefix`` tokens (class / distillation tokens) always kept in front.
* ``gather_tokens`` / ``gather_positions`` / ``scatter_positions``: move rows in and out of the kept subset.

Kept indices are sorted in sequence order. The paper takes them in significance order; attention after a position
embedding does not depend on token order, and sorted indices make ``keep = 1`` an exact identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchSignificance(nn.Module):
    """``proposal(image)`` averaged over channels: the patch significance map ``(B, 1, h, w)``.

    Args:
        proposal: a module mapping the image to a ``(B, C, h, w)`` feature map; frozen (no gradients, eval mode).
        name: the proposal's registry name (kept for error messages and reports).
    """

    def __init__(self, proposal: nn.Module, name: str = "") -> None:
        super().__init__()
        self.proposal = proposal.eval().requires_grad_(False)
        self.proposal_name = name

    def train(self, mode: bool = True) -> PatchSignificance:
        super().train(mode)
        self.proposal.eval()  # selection never uses batch statistics or dropout
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.proposal(image)  # [B, C, h, w]
        return features.float().mean(1, keepdim=True)  # [B, 1, h, w]

    def extra_repr(self) -> str:
        return f"proposal={self.proposal_name!r}"


def keep_count(n_tokens: int, keep: float, prefix: int) -> int:
    """Tokens kept, ``int(n_tokens * keep)`` counting the prefix tokens, and at least one patch besides them."""
    return min(n_tokens, max(prefix + 1, int(n_tokens * keep)))


def select_tokens(significance: torch.Tensor, grid_h: int, grid_w: int, count: int, prefix: int) -> torch.Tensor:
    """Indices ``[B, count]`` into a sequence of ``prefix`` tokens followed by a ``grid_h x grid_w`` patch grid.

    The significance map is resized to the grid (bicubic, ``align_corners=True``), the ``count - prefix`` most
    significant patches are taken per image, and the prefix tokens ``0..prefix-1`` are prepended.
    """
    score = F.interpolate(significance, size=(grid_h, grid_w), mode="bicubic", align_corners=True).flatten(1)
    top = score.topk(count - prefix, dim=1).indices.sort(dim=1).values + prefix  # [B, count - prefix]
    if prefix == 0:
        return top
    head = torch.arange(prefix, device=top.device, dtype=top.dtype).expand(top.shape[0], prefix)
    return torch.cat([head, top], dim=1)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tokens[b, idx[b]]``: ``[B, N, D]`` -> ``[B, K, D]``."""
    return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def gather_positions(x: torch.Tensor, idx: torch.Tensor, flat: bool = False) -> torch.Tensor:
    """Channels-last map ``[B, H, W, C]`` (``flat``: ``[B, H * W, C]``) -> the kept positions ``[B, K, C]``."""
    return gather_tokens(x if flat else x.flatten(1, 2), idx)


def scatter_positions(rows: torch.Tensor, idx: torch.Tensor, height: int, width: int,
                      flat: bool = False) -> torch.Tensor:
    """Rows ``[B, K, C]`` put back at ``idx`` of an ``[B, H, W, C]`` map (``flat``: ``[B, H * W, C]``) that is zero
    everywhere else."""
    out = rows.new_zeros(rows.shape[0], height * width, rows.shape[-1])
    out = out.scatter(1, idx.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), rows)
    return out if flat else out.unflatten(1, (height, width))


__all__ = ["PatchSignificance", "keep_count", "select_tokens", "gather_tokens", "gather_positions", "scatter_positions"]
