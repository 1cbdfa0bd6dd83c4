"""Normalization-scale criterion: |gamma| of the unit's norm layers (Network Slimming, arXiv 1708.06519).

Groups holding no norm scale fall back to the L1 criterion, so every group can still be ranked.
"""
from __future__ import annotations

import numpy as np

from ..analysis import Analysis
from .base import ScoreContext, register_criterion, slot_values, unit_sum
from .magnitude import L1Criterion


@register_criterion("bn_scale")
class BNScaleCriterion:
    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        has_scale = slot_values(analysis, ("scale",), lambda v: v.new_ones(v.shape[0]))
        scale = unit_sum(analysis, slot_values(analysis, ("scale",), lambda v: v.abs().sum(1)))
        units_with_scale = unit_sum(analysis, has_scale) > 0
        n_groups = analysis.unit_group.max() + 1
        group_has = np.bincount(analysis.unit_group, weights=units_with_scale, minlength=n_groups) > 0
        fallback = ~group_has[analysis.unit_group]
        if fallback.any():
            scale[fallback] = L1Criterion().score(analysis, ctx)[fallback]
        return scale
