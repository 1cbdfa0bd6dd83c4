"""Criteria on a two-layer toy whose scores are worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.criteria import ScoreContext, available, get_criterion
from fxprune.testing import analyze_model, units_of


class TwoLayer(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 2, 1, bias=False)
        with torch.no_grad():
            for j in range(4):
                self.conv1.weight[j] = (j + 1) * (-1) ** j  # |w| = j + 1 on 27 weights
            self.conv2.weight.fill_(0.5)  # 2 weights of 0.5 read each channel
            if bn:
                self.bn.weight.copy_(torch.tensor([0.3, -2.0, 0.1, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.conv1(x)))


def _scores(name: str, bn: bool) -> np.ndarray:
    a = analyze_model(TwoLayer(bn), torch.randn(1, 3, 5, 5))
    scores = get_criterion(name).score(a, ScoreContext(seed=1))
    return scores[units_of(a, "@conv1:0:0")]


def test_l1_by_hand() -> None:
    j = np.arange(4)
    np.testing.assert_allclose(_scores("l1", False), 27 * (j + 1) + 2 * 0.5, rtol=1e-6)


def test_l2_by_hand() -> None:
    j = np.arange(4)
    np.testing.assert_allclose(_scores("l2", True), np.sqrt(27 * (j + 1) ** 2 + 2 * 0.25), rtol=1e-6)


def test_bn_scale_by_hand_and_fallback() -> None:
    np.testing.assert_allclose(_scores("bn_scale", True), [0.3, 2.0, 0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(_scores("bn_scale", False), _scores("l1", False))  # no BN: falls back to L1


def test_random_is_seeded() -> None:
    a, b = _scores("random", False), _scores("random", False)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 4


def test_registry_lists_issue_criteria() -> None:
    assert {"l1", "l2", "bn_scale", "random"} <= set(available())
    with pytest.raises(ValueError, match="unknown criterion"):
        get_criterion("nope")
