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

import numpy as np
import torch

from ..graph.dependency import Analysis
from .base import ScoreContext, register_criterion, slot_values, unit_sum
from .lamp import lamp_scores

WEIGHT_ROLES = ("weight", "weight_in")


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
