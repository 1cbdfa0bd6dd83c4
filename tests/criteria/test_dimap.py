"""DIMAP structured scores (arXiv 2404.13648): slice scores worked out by hand on a two-layer toy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.criteria import ScoreContext, get_criterion
from fxprune.testing import analyze_model, units_of


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            # row squared norms 14, 4, 3, 16
            self.fc1.weight.copy_(torch.tensor([[3.0, -1.0, 2.0], [2.0, 0.0, 0.0], [1.0, 1.0, -1.0], [0.0, 0.0, 4.0]]))
            self.fc1.bias.fill_(50.0)  # not counted
            # column squared norms 1, 4, 0.25, 1
            self.fc2.weight.copy_(torch.tensor([[1.0, 2.0, 0.5, 0.0], [0.0, 0.0, 0.0, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_dimap_slice_scores_by_hand() -> None:
    a = analyze_model(TwoLinear(), torch.zeros(1, 3))
    got = get_criterion("dimap").score(a, ScoreContext())[units_of(a, "@fc1:0:0")]
    # fc1 rows, descending 16, 14, 4, 3: 16/16, 14/30, 4/34, 3/37.
    rows = np.array([14 / 30, 4 / 34, 3 / 37, 16 / 16])
    # fc2 columns, descending 4, 1, 1, 0.25: 4/4, ties 1/(4+1+1) each, 0.25/6.25.
    cols = np.array([1 / 6, 4 / 4, 0.25 / 6.25, 1 / 6])
    np.testing.assert_allclose(got, rows + cols, rtol=1e-6)


def test_dimap_is_scale_invariant_per_layer() -> None:
    """Scaling one layer's weights leaves every score unchanged: the score is normalized per layer."""
    m = TwoLinear()
    a = analyze_model(m, torch.zeros(1, 3))
    before = get_criterion("dimap").score(a, ScoreContext())
    with torch.no_grad():
        m.fc1.weight.mul_(7.0)
    a2 = analyze_model(m, torch.zeros(1, 3))
    np.testing.assert_allclose(get_criterion("dimap").score(a2, ScoreContext()), before, rtol=1e-6)
    assert not np.allclose(get_criterion("l2").score(a2, ScoreContext()), get_criterion("l2").score(a, ScoreContext()))


def test_weight_level_masks_one_threshold_per_family() -> None:
    from fxprune.criteria.dimap import weight_masks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    with torch.no_grad():
        net[1].weight.mul_(100.0)  # a layer of large weights still loses weights: scores are per-layer normalized
    masks = weight_masks(net, {"mlp": ["0", "1"]}, 0.5)
    assert set(masks) == {"0.weight", "1.weight"}  # layer 2 is in no family: never masked
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == (8 * 16 + 16 * 8) // 2
    assert 0 < int(masks["1.weight"].sum()) < masks["1.weight"].numel()
    # inside a layer, the kept weights are the largest ones
    w, m = net[0].weight.detach().abs(), masks["0.weight"]
    assert w[m].min() >= w[~m].max()
    with pytest.raises(ValueError, match="sparsity"):
        weight_masks(net, {"mlp": ["0"]}, 1.0)
