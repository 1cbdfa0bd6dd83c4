"""LAMP: layer-adaptive magnitude-based pruning scores, aggregated per channel unit.

Source: Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", arXiv 2010.07611. For a weight
``w`` of a layer (one parameter tensor), ``score(w) = w^2 / sum of v^2 over the layer's weights v with
|v| >= |w|``. The largest weight of every layer scores 1, so scores are comparable across layers.

Our reading (the paper prunes single weights, fxprune removes channels):
- A unit's score is the sum of the LAMP scores of the weights it owns: the rows it produces (``weight``) and
  the columns that read it (``weight_in``), each scored inside its own parameter tensor. Biases and norm
  parameters do not count, as in the paper (it scores conv and linear weights only).
- Ties: every weight of equal magnitude gets the same score (all of them are "at least as large").
"""
from __future__ import annotations

import numpy as np
import torch

from ..analysis import Analysis
from .base import ScoreContext, register_criterion
from .taylor import unit_scores_of

WEIGHT_ROLES = ("weight", "weight_in")


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of every value of ``w`` (same shape): ``w^2 / sum(v^2 for |v| >= |w|)``; 0 where the sum is 0."""
    sq = w.detach().double().reshape(-1).pow(2)
    ordered, _ = torch.sort(sq)
    suffix = torch.flip(torch.cumsum(torch.flip(ordered, (0,)), 0), (0,))  # suffix[i] = sum(ordered[i:])
    first = torch.searchsorted(ordered, sq, right=False)  # first position of an equal value: ties share the sum
    denom = suffix[first]
    out = torch.where(denom > 0, sq / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    return out.reshape(w.shape).float()


@register_criterion("lamp")
class LAMPCriterion:
    """Sum of the per-weight LAMP scores of the weights a unit owns (data-free)."""

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        values = {name: lamp_scores(p) for name, p in analysis.gm.named_parameters()}
        return unit_scores_of(analysis, values, WEIGHT_ROLES)
