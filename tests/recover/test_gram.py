"""``Gram``: the normal equations against numpy on the raw rows, for a width that takes the blocked lower-triangle
accumulation (more than 512 inputs) and for a batch of grouped regressions; with float64 chunk products exactly
(to float64 rounding), with the default float32 ones within float32 rounding of each entry's scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fxprune.recover.gram import Gram

#: (products, entry tolerance relative to sqrt(a_ii a_jj), solution tolerance relative to its norm)
PRECISIONS = [(torch.float64, 1e-12, 1e-9), (torch.float32, 2e-6, 1e-5)]


def _scaled_error(got: np.ndarray, want: np.ndarray, scale: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / scale))


@pytest.mark.parametrize("products, entry_tol, solution_tol", PRECISIONS)
@pytest.mark.parametrize("groups, n_in", [(1, 700), (3, 20)])
def test_normal_equations_equal_numpy(groups: int, n_in: int, products: torch.dtype, entry_tol: float,
                                      solution_tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    # rows past one float32 chunk (2048) and a nonzero mean, as post-ReLU activations have
    xs = [torch.randn(groups, r, n_in, generator=g) + 0.5 for r in (3000, 257)]
    ys = [torch.randn(groups, len(x[0]), 4, generator=g) for x in xs]
    gram = Gram(groups, n_in, 4, products=products)
    for x, y in zip(xs, ys):
        gram.add(x, y)
    a, b = gram.augmented()
    x = torch.cat(xs, 1).double().numpy()
    y = torch.cat(ys, 1).double().numpy()
    for k in range(groups):
        xa = np.hstack([x[k], np.ones((len(x[k]), 1))])
        want_a, want_b = xa.T @ xa, xa.T @ y[k]
        d = np.sqrt(np.diag(want_a))
        assert _scaled_error(a[k].numpy(), want_a, d[:, None] * d[None, :]) < entry_tol
        yd = np.sqrt(np.sum(y[k] ** 2, 0))
        assert _scaled_error(b[k].numpy(), want_b, d[:, None] * yd[None, :]) < entry_tol
    assert float(gram.yy.sum()) == pytest.approx(float(np.sum(y ** 2)), rel=entry_tol)
    w, residual = gram.solve(torch.zeros(groups, n_in + 1, 4), 0.1)
    lam = 0.1 * np.mean(np.sum(x * x, 1), 1)  # per group
    err = 0.0
    for k in range(groups):
        xa = np.hstack([x[k], np.ones((len(x[k]), 1))])
        want = np.linalg.solve(xa.T @ xa + lam[k] * np.eye(n_in + 1), xa.T @ y[k])
        assert np.linalg.norm(w[k].numpy() - want) <= solution_tol * np.linalg.norm(want)
        err += np.sum((xa @ w[k].numpy() - y[k]) ** 2)
    assert residual == pytest.approx(err, rel=100 * solution_tol)


def test_products_dtype_is_checked() -> None:
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        Gram(1, 2, 2, products=torch.float16)
