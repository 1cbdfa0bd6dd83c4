"""Second-order criterion with an empirical-Fisher diagonal Hessian: per unit, ``0.5 * sum(F * w^2)``.

Removing a weight ``w`` at a minimum of the loss changes it by about ``0.5 * H_ww * w^2`` (Optimal Brain Damage,
LeCun et al. 1990); the diagonal of the Hessian is approximated by the empirical Fisher ``F = E[g^2]``, as in
LPViT's second-order distortion term (arXiv 2407.02068, ``g g^T`` Hessian approximation) and WoodFisher
(arXiv 2004.14340).

Our reading (not fixed by the papers):
- ``E[g^2]`` is the mean over calibration *batches* of the squared batch gradient (with batch size 1 this is the
  per-sample empirical Fisher; larger batches give a cheaper, smoother estimate).
- Loss, data convention and the values a unit owns are those of the ``taylor`` criterion (see ``taylor.py``).
- The first-order term is dropped (the model is assumed trained to a minimum), so the score is always >= 0.
"""
from __future__ import annotations

import numpy as np

from ..analysis import Analysis
from .base import ScoreContext, register_criterion
from .taylor import grad_statistic, unit_scores_of


@register_criterion("hessian")
class HessianCriterion:
    """``0.5 * sum over the unit's values of E[g^2] * w^2`` (needs ``data``)."""

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        fisher = grad_statistic(analysis, ctx, "hessian", lambda w, g: g.pow(2))
        params = dict(analysis.gm.named_parameters())
        values = {name: 0.5 * f * params[name].detach().float().pow(2) for name, f in fisher.items()}
        return unit_scores_of(analysis, values)
