"""Magnitude criteria: the L1 / L2 norm of every weight a unit owns (rows it produces and columns that read it).

Filter-norm pruning: Li et al., "Pruning Filters for Efficient ConvNets", arXiv 1608.08710; summing over all
coupled layers of a group follows DepGraph (arXiv 2301.12900).
"""
from __future__ import annotations

import numpy as np

from ..analysis import Analysis
from .base import ScoreContext, register_criterion, slot_values, unit_sum

WEIGHT_ROLES = ("weight", "weight_in")


@register_criterion("l1")
class L1Criterion:
    """Sum of absolute weights owned by the unit."""

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        return unit_sum(analysis, slot_values(analysis, WEIGHT_ROLES, lambda v: v.abs().sum(1)))


@register_criterion("l2")
class L2Criterion:
    """Euclidean norm of all weights owned by the unit."""

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        return np.sqrt(unit_sum(analysis, slot_values(analysis, WEIGHT_ROLES, lambda v: v.pow(2).sum(1))))
