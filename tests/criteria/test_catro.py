"""CATRO (arXiv 2110.10921): scatter diagonals by hand, trace-ratio optimality, and the nested removal order."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.criteria import ScoreContext, get_criterion
from fxprune.criteria.catro import class_scatter, elimination_order, trace_ratio
from fxprune.errors import FxPruneError
from fxprune.testing import analyze_model, units_of

# class 0: (0, 1), (0, -1); class 1: (2, 1), (2, -1)
X = torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
Y = torch.tensor([0, 0, 1, 1])


class Hidden3(nn.Module):
    """Hidden features h = (x0, x1, x0 + x1): one separates the classes, one is noise, one is mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=False)
        self.fc2 = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def test_class_scatter_by_hand() -> None:
    h = X @ torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    sb, sw = class_scatter(h.numpy(), Y.numpy())
    # feature 0: class means 0, 2, overall 1 -> S_b = 2*1 + 2*1, S_w = 0
    # feature 1: class means 0, 0 -> S_b = 0, S_w = 4 * 1
    # feature 2: values 1, -1 | 3, 1: means 0, 2 -> S_b = 4, S_w = 1 + 1 + 1 + 1
    np.testing.assert_allclose(sb, [4.0, 0.0, 4.0])
    np.testing.assert_allclose(sw, [0.0, 4.0, 4.0])


def test_trace_ratio_finds_the_best_subset() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        sb, sw = rng.random(7), rng.random(7) + 0.05
        keep, lam = trace_ratio(sb, sw, 3)
        best = max(sb[list(c)].sum() / sw[list(c)].sum() for c in itertools.combinations(range(7), 3))
        assert keep.sum() == 3
        assert lam == pytest.approx(best, rel=1e-9)
        assert sb[keep].sum() / sw[keep].sum() == pytest.approx(best, rel=1e-9)


def test_trace_ratio_is_not_the_per_unit_ratio_ranking() -> None:
    # ratios 10, 1, 0: the per-unit ranking keeps {0, 1} (J = 10.5 / 1.5 = 7), but the joint objective keeps the
    # useless, tiny unit 2 instead, which barely dilutes unit 0 (J = 10 / 1.01)
    sb, sw = np.array([10.0, 0.5, 0.0]), np.array([1.0, 0.5, 0.01])
    keep, lam = trace_ratio(sb, sw, 2)
    assert keep.tolist() == [True, False, True]
    assert lam == pytest.approx(10 / 1.01)


def test_elimination_order_by_hand() -> None:
    # all: lambda = 8/8 = 1, terms 4, -4, 0 -> drop 1; {0, 2}: lambda = 2, terms 4, -4 -> drop 2
    assert elimination_order(np.array([4.0, 0.0, 4.0]), np.array([0.0, 4.0, 4.0])).tolist() == [1, 2, 0]


def test_catro_criterion_on_toy_features() -> None:
    a = analyze_model(Hidden3(), torch.zeros(1, 2))
    got = get_criterion("catro").score(a, ScoreContext(data=[(X[:2], Y[:2]), (X[2:], Y[2:])]))
    # nested order [1, 2, 0] (see above) with S_b = [4, 0, 4]: cumulative share of S_b lost 0, 1/2, 1
    np.testing.assert_allclose(got[units_of(a, "@fc1:0:0")], [1.0, 0.0, 0.5], atol=1e-9)


def test_catro_needs_labels() -> None:
    a = analyze_model(Hidden3(), torch.zeros(1, 2))
    with pytest.raises(FxPruneError, match="catro.*labeled"):
        get_criterion("catro").score(a, ScoreContext(data=[X]))


class TwoBranches(nn.Module):
    """Branch a: 2 informative hidden channels and 4 dead ones; branch b: 6 equally informative channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 6), nn.Linear(2, 6)
        self.ha, self.hb = nn.Linear(6, 2), nn.Linear(6, 2)
        with torch.no_grad():
            for m in (self.a, self.b):
                m.weight.zero_()
                m.bias.zero_()
            self.a.weight[:2, 0] = 1.0
            self.b.weight[:, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ha(torch.relu(self.a(x))) + self.hb(torch.relu(self.b(x)))


def test_catro_global_scope_allocates_layer_rates() -> None:
    torch.manual_seed(0)
    labels = torch.arange(40) % 2
    x = torch.stack([labels.float() * 3 + 0.1 * torch.randn(40), torch.randn(40)], 1)
    model = TwoBranches().eval()
    recipe = {"stages": [{"target": {"sparsity": 1 / 3}, "criterion": "catro", "scope": "global"}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x[:2], data=[(x, labels)])
    # stage 2: the branch whose discriminative scatter sits in few channels gives up its dead ones first
    assert (pruned.a.out_features, pruned.b.out_features) == (2, 6)
    local = fxprune.compile(model, {"stages": [{**recipe["stages"][0], "scope": "local"}]}, example_inputs=x[:2],
                            data=[(x, labels)])
    assert (local.a.out_features, local.b.out_features) == (4, 4)
