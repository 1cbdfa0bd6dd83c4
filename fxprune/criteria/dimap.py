"""DIMAP: data-independent module-aware pruning scores, in a structured (channel) form.

Source: He & Zhou, "Data-independent Module-aware Pruning for Hierarchical Vision Transformers", arXiv 2404.13648
(no code released). Per layer, weights sorted by magnitude in descending order score
``w_j^2 / sum_{i <= j} w_i^2``: the squared weight over the layer's squared Frobenius norm restricted to the
weights at least as large, derived from bounding the output distortion by ``||W - W_pruned||_F / ||W||_F``.
Scores are compared only inside a *module* (all qkv layers, all attention projections, all MLP fc1 + fc2 layers):
use this criterion with the recipe's ``scope: "module"`` and ``modules`` families (see ``planner.py``).

Our reading (the paper prunes single weights, fxprune removes channels):
- The element whose removal the bound counts is a channel's *slice* of a layer: the row it produces or the
  column that reads it. A slice's contribution to ``||W - W_pruned||_F^2`` is its squared norm, so each slice
  scores ``||s||^2 / sum of ||s'||^2 over the layer's slices s' with ||s'|| >= ||s||`` (the DIMAP formula with
  slices in place of weights; ties share the sum).
- A unit's score sums the scores of its slices over every layer it touches (producer rows and consumer
  columns), i.e. the bound's distortion terms add up over the layers a channel removal changes.
- Biases and norm parameters do not count (the paper scores weight matrices only).
For the weight-level LAMP score aggregated per channel, use the ``lamp`` criterion.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..analysis import Analysis
from .base import ScoreContext, register_criterion, slot_values, unit_sum
from .lamp import lamp_scores

WEIGHT_ROLES = ("weight", "weight_in")
log = logging.getLogger(__name__)


def slice_scores(analysis: Analysis) -> np.ndarray:
    """Per slot: the DIMAP score of the weight slice a parameter-axis slot owns (0 on tensor spaces)."""
    sq = slot_values(analysis, WEIGHT_ROLES, lambda v: v.pow(2).sum(1))
    out = np.zeros_like(sq)
    for i, space in enumerate(analysis.spaces):
        if not space.is_param:
            continue
        lo, hi = int(analysis.offsets[i]), int(analysis.offsets[i] + analysis.sizes[i])
        out[lo:hi] = lamp_scores(torch.from_numpy(np.sqrt(sq[lo:hi]))).double().numpy()
    return out


@register_criterion("dimap")
class DIMAPCriterion:
    """Sum over the layers a unit touches of its slice's DIMAP score (data-free)."""

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        return unit_sum(analysis, slice_scores(analysis))


def weight_masks(model: torch.nn.Module, modules: dict[str, list[str]], sparsity: float) -> dict[str, torch.Tensor]:
    """DIMAP's weight-level (unstructured) form: keep-masks for the weights of every layer in a module family.

    Each ``nn.Linear`` / ``nn.Conv*`` weight whose module path matches a family's glob patterns scores every value
    by ``w^2 / sum(v^2 for |v| >= |w|)`` within its own layer; one threshold per family then removes the fraction
    ``sparsity`` of that family's weights (our reading of the paper: the same sparsity in every family). Layers in
    no family get no mask (DIMAP never prunes patch embedding, patch merging or norms).

    Returns:
        ``{"<module path>.weight": bool tensor}`` (``True`` = keep), e.g. for a block-sparse or masked stage.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    import fnmatch

    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    masks: dict[str, torch.Tensor] = {}
    for family, patterns in modules.items():
        members = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, layers) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if not members:
            continue
        scores = [lamp_scores(m.weight) for _, m in members]
        flat = torch.cat([s.reshape(-1) for s in scores])
        k = int(sparsity * flat.numel())  # weights removed in this family
        threshold = torch.kthvalue(flat, k).values if k > 0 else flat.new_tensor(-1.0)
        removed = 0
        for (name, _), s in zip(members, scores):
            keep = s > threshold
            masks[f"{name}.weight"] = keep
            removed += int((~keep).sum())
        log.debug("dimap family %s: %d of %d weights masked", family, removed, flat.numel())
    return masks
