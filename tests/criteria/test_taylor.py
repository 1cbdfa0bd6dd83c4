"""Taylor criterion (arXiv 1906.10771 / 2407.02068) on a linear two-layer toy whose gradients are worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.criteria import ScoreContext, get_criterion
from fxprune.errors import FxPruneError
from fxprune.testing import analyze_model, units_of

W1 = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [3.0, 0.5, -1.0], [-0.5, 0.25, 2.0]])
W2 = np.array([[1.0, -1.0, 0.5, 2.0], [0.5, 2.0, -1.0, 1.0]])


class Linear2(nn.Module):
    """y = W2 (W1 x): no bias, no activation, so dL/dW has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4, bias=False)
        self.fc2 = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor(W1))
            self.fc2.weight.copy_(torch.tensor(W2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def hand_grads(x: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dW1, dL/dW2) for L = mean(y^2) (unlabeled) or the mean cross-entropy (labeled)."""
    h = x @ W1.T
    y = h @ W2.T
    b = len(x)
    if labels is None:
        dy = 2 * y / y.size
    else:
        p = np.exp(y - y.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dy = (p - np.eye(2)[labels]) / b
    g2 = dy.T @ h
    g1 = (dy @ W2).T @ x
    return g1, g2


def scores(name: str, data: list) -> np.ndarray:
    a = analyze_model(Linear2(), torch.zeros(1, 3))
    s = get_criterion(name).score(a, ScoreContext(data=data))
    return s[units_of(a, "@fc1:0:0")]


def batch(seed: int, n: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3))


def test_taylor_unlabeled_output_energy_by_hand() -> None:
    x = batch(0)
    g1, g2 = hand_grads(x, None)
    want = np.abs(W1 * g1).sum(1) + np.abs(W2 * g2).sum(0)
    np.testing.assert_allclose(scores("taylor", [torch.tensor(x, dtype=torch.float32)]), want, rtol=1e-4)


def test_taylor_labeled_cross_entropy_averages_batches() -> None:
    xa, xb = batch(1), batch(2)
    ya, yb = np.array([0, 1, 1, 0, 1]), np.array([1, 1, 0, 0, 0])
    want = np.zeros(4)
    for x, y in ((xa, ya), (xb, yb)):
        g1, g2 = hand_grads(x, y)
        want += (np.abs(W1 * g1).sum(1) + np.abs(W2 * g2).sum(0)) / 2
    data = [(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) for x, y in ((xa, ya), (xb, yb))]
    got = scores("taylor", data)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.argmin(got) == np.argmin(want)


@pytest.mark.parametrize("name", ["taylor", "hessian", "catro"])
def test_missing_data_names_the_criterion(name: str) -> None:
    a = analyze_model(Linear2(), torch.zeros(1, 3))
    with pytest.raises(FxPruneError, match=f"criterion '{name}' needs"):
        get_criterion(name).score(a, ScoreContext())


def test_exhausted_iterator_is_reported() -> None:
    a = analyze_model(Linear2(), torch.zeros(1, 3))
    with pytest.raises(FxPruneError, match="no batches"):
        get_criterion("taylor").score(a, ScoreContext(data=iter([])))
