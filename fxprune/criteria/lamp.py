"""LAMP: layer-adaptive magnitude-based pruning scores, for channel units.

Source: Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", arXiv 2010.07611. For a weight
``w`` of a layer, ``score(w) = w^2 / sum of v^2 over the layer's weights v with |v| >= |w|``. Within a layer the
score orders weights exactly as their magnitude does; the largest scores 1, so one global threshold compares
layers and sets each layer's sparsity (the paper's point: layer-adaptive sparsity for magnitude pruning).

Our reading for channel units (fxprune removes channels, the paper single weights), as in structured LAMP
(Torch-Pruning's ``LAMPImportance``): the "weights" are the units and the "layer" is the unit's group.
- A unit's magnitude is the squared L2 norm of the weights it owns: the rows it produces (``weight``) and the
  columns that read it (``weight_in``); biases and norm parameters do not count (the paper scores conv and linear
  weights only). That is ``l2``'s norm, squared.
- ``score(u) = |u|² / sum of |v|² over the units v of the same group with |v| >= |u|``. Within a group the order is
  ``l2``'s, so with ``scope: local`` (the same fraction of every group) lamp makes ``l2``'s plan; with ``scope:
  global`` the scores are compared as they are (``comparable_across_groups``: no mean-normalization), which sets
  each group's rate.
- Ties: every unit of equal magnitude gets the same score (all of them are "at least as large").

(An earlier reading summed the per-weight scores over a unit's weights. That sum is not monotone in the unit's
magnitude: it counts a unit's few largest weights and all but ignores the rest, so it ranked units inside a group
by something else than magnitude. On the digits ViT at FLOPs -30% it lost 11.7 points to l2 before recovery.)
"""
from __future__ import annotations

import numpy as np
import torch

from ..analysis import Analysis
from .base import ScoreContext, register_criterion, slot_values, unit_sum

WEIGHT_ROLES = ("weight", "weight_in")


def lamp_normalize(sq: torch.Tensor) -> torch.Tensor:
    """LAMP of non-negative magnitudes ``sq`` (any shape): ``sq / sum(s for s >= sq)``; 0 where the sum is 0."""
    flat = sq.detach().double().reshape(-1)
    ordered, _ = torch.sort(flat)
    suffix = torch.flip(torch.cumsum(torch.flip(ordered, (0,)), 0), (0,))  # suffix[i] = sum(ordered[i:])
    first = torch.searchsorted(ordered, flat, right=False)  # first position of an equal value: ties share the sum
    denom = suffix[first]
    out = torch.where(denom > 0, flat / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(flat))
    return out.reshape(sq.shape)


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of every value of ``w`` (same shape): ``w^2 / sum(v^2 for |v| >= |w|)``; 0 where the sum is 0."""
    return lamp_normalize(w.detach().double().pow(2)).float()


@register_criterion("lamp")
class LAMPCriterion:
    """LAMP over the units of each group, on the units' squared L2 norms (data-free)."""

    comparable_across_groups = True  # each group's largest unit scores 1: ``global`` compares the scores as they are

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        sq = unit_sum(analysis, slot_values(analysis, WEIGHT_ROLES, lambda v: v.pow(2).sum(1)))
        out = np.zeros_like(sq)
        for g in np.unique(analysis.unit_group):
            units = np.flatnonzero(analysis.unit_group == g)
            out[units] = lamp_normalize(torch.from_numpy(sq[units])).numpy()
        return out
