"""LAMP scores (arXiv 2010.07611): per-weight values by hand, the per-unit scores (LAMP over the units of a group)
on a two-layer toy, and l2's plan under ``scope: local``."""
from __future__ import annotations

import numpy as np
import torch
from fixtures import ResCatNet
from torch import nn

import fxprune
from fxprune.criteria import ScoreContext, get_criterion
from fxprune.criteria.lamp import lamp_scores
from fxprune.testing import analyze_model, units_of


def by_definition(w: np.ndarray) -> np.ndarray:
    """score(w) = w^2 / sum of v^2 over all v with |v| >= |w|, straight from the definition (O(n^2))."""
    flat = w.reshape(-1)
    out = np.array([x * x / sum(v * v for v in flat if abs(v) >= abs(x)) for x in flat])
    return out.reshape(w.shape)


def test_lamp_scores_by_hand_with_ties() -> None:
    got = lamp_scores(torch.tensor([3.0, -1.0, 2.0, 2.0])).numpy()
    # squares 9, 1, 4, 4: the largest scores 9/9; each 2 scores 4/(9+4+4); the 1 scores 1/18
    np.testing.assert_allclose(got, [1.0, 1 / 18, 4 / 17, 4 / 17], rtol=1e-6)
    assert lamp_scores(torch.zeros(3)).abs().sum() == 0  # an all-zero layer scores 0, not NaN


def test_lamp_matches_definition_on_random_tensor() -> None:
    w = torch.randn(5, 7)
    np.testing.assert_allclose(lamp_scores(w).numpy(), by_definition(w.numpy().astype(np.float64)), rtol=1e-5)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_lamp_normalizes_unit_magnitudes_within_the_group_not_biases() -> None:
    """A unit's magnitude is the squared norm of its fc1 row and fc2 column (biases do not count); its score is
    LAMP over the units of its group, by the definition."""
    m = TwoLinear()
    with torch.no_grad():
        m.fc1.bias.fill_(100.0)  # biases must not count
    a = analyze_model(m, torch.zeros(1, 3))
    got = get_criterion("lamp").score(a, ScoreContext())[units_of(a, "@fc1:0:0")]
    w1, w2 = m.fc1.weight.detach().double().numpy(), m.fc2.weight.detach().double().numpy()
    norms = np.sqrt((w1 ** 2).sum(1) + (w2 ** 2).sum(0))
    np.testing.assert_allclose(got, by_definition(norms), rtol=1e-5)
    assert got.max() == 1.0  # the group's largest unit


def test_lamp_orders_each_group_as_l2_so_local_scope_gives_l2s_plan() -> None:
    """Within a layer LAMP orders as magnitude does (the paper's property), so only ``global`` differs from l2."""
    torch.manual_seed(0)
    model = ResCatNet().eval()
    x = torch.randn(2, 3, 8, 8)
    plans = {c: fxprune.compile(model, {"stages": [{"target": {"flops": 0.4}, "criterion": c}]},
                                example_inputs=x).fxprune_plan.kept for c in ("l2", "lamp")}
    assert plans["lamp"] == plans["l2"]
