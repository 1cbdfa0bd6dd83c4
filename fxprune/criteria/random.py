"""Random scores: the baseline every criterion must beat. Seeded by the stage's ``seed``."""
from __future__ import annotations

import numpy as np

from ..analysis import Analysis
from .base import ScoreContext, register_criterion


@register_criterion("random")
class RandomCriterion:
    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        return np.random.default_rng(ctx.seed).random(analysis.n_units)
