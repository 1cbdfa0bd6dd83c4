"""``Gram``: the normal equations against numpy on the raw rows, for a width that takes the blocked lower-triangle
accumulation (more than 512 inputs) and for a batch of grouped regressions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fxprune.recover.gram import Gram


@pytest.mark.parametrize("groups, n_in", [(1, 700), (3, 20)])
def test_normal_equations_equal_numpy(groups: int, n_in: int) -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(groups, r, n_in, generator=g) for r in (300, 257)]
    ys = [torch.randn(groups, len(x[0]), 4, generator=g) for x in xs]
    gram = Gram(groups, n_in, 4)
    for x, y in zip(xs, ys):
        gram.add(x, y)
    a, b = gram.augmented()
    x = torch.cat(xs, 1).double().numpy()
    y = torch.cat(ys, 1).double().numpy()
    for k in range(groups):
        xa = np.hstack([x[k], np.ones((len(x[k]), 1))])
        np.testing.assert_allclose(a[k].numpy(), xa.T @ xa, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(b[k].numpy(), xa.T @ y[k], rtol=1e-10, atol=1e-9)
    w, residual = gram.solve(torch.zeros(groups, n_in + 1, 4), 0.1)
    lam = 0.1 * np.mean(np.sum(x * x, 1), 1)  # per group
    for k in range(groups):
        xa = np.hstack([x[k], np.ones((len(x[k]), 1))])
        want = np.linalg.solve(xa.T @ xa + lam[k] * np.eye(n_in + 1), xa.T @ y[k])
        np.testing.assert_allclose(w[k].numpy(), want, rtol=1e-8, atol=1e-10)
    err = sum(np.sum((np.hstack([x[k], np.ones((len(x[k]), 1))]) @ w[k].numpy() - y[k]) ** 2) for k in range(groups))
    assert residual == pytest.approx(err, rel=1e-8)
