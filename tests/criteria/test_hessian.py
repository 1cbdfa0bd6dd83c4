"""Empirical-Fisher second-order criterion: 0.5 * sum(E[g^2] * w^2) per unit, checked against closed-form gradients."""
from __future__ import annotations

import numpy as np
import torch
from test_taylor import W1, W2, batch, hand_grads, scores


def test_hessian_fisher_diagonal_by_hand() -> None:
    xs = [batch(3), batch(4)]
    ys = [np.array([1, 0, 0, 1, 1]), np.array([0, 0, 1, 1, 0])]
    f1, f2 = np.zeros_like(W1), np.zeros_like(W2)
    for x, y in zip(xs, ys):
        g1, g2 = hand_grads(x, y)
        f1 += g1 ** 2 / 2
        f2 += g2 ** 2 / 2
    want = 0.5 * ((f1 * W1 ** 2).sum(1) + (f2 * W2 ** 2).sum(0))
    data = [(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) for x, y in zip(xs, ys)]
    np.testing.assert_allclose(scores("hessian", data), want, rtol=1e-4)


def test_hessian_is_nonnegative_and_differs_from_taylor() -> None:
    data = [torch.tensor(batch(5), dtype=torch.float32)]
    h, t = scores("hessian", data), scores("taylor", data)
    assert (h >= 0).all() and h.sum() > 0
    assert not np.allclose(h / h.sum(), t / t.sum())
