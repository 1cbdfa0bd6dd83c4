"""Streamed float64 normal equations of a (batched) ridge regression ``Y ≈ [X, 1] W``.

``Gram.add`` folds in one batch of rows; only ``XᵀX``, ``Xᵀ1``, ``XᵀY``, ``1ᵀY``, ``ΣY²`` and the row count are
kept, so memory is independent of the number of calibration samples. ``Gram.reduce`` sums them over
``torch.distributed`` ranks, and ``Gram.solve`` returns

    W = argmin ||[X, 1] W - Y||² + λ ||W - W0||²,   λ = ridge · mean(diag(XᵀX)),

the ridge pulling towards the current weights ``W0`` (scale-free: ``ridge`` is relative to the mean input energy).

**Precision.** The sums over chunks, batches and ranks are always float64. Each chunk's matrix products run in
``products`` (float32 by default: about 1.7x faster than float64 on CPU BLAS). A float32 chunk product of at most
``_PRODUCT_ROWS`` rows carries a relative error of about ``1e-6`` of its entries; the ridge (``λ`` at least
``1e-2`` of the mean input energy by default) bounds how much that moves the solution (``tests/recover``
measures it against numpy). ``products=torch.float64`` gives the exact float64 normal equations.
"""
from __future__ import annotations

import torch

from .. import distributed

#: rows folded in per matrix product: bounds the float64 copy of a chunk to about 32 MB
_CHUNK_ELEMENTS = 1 << 22
#: rows of one float32 chunk product (bounds its rounding error; float64 chunks are bounded by ``_CHUNK_ELEMENTS``)
_PRODUCT_ROWS = 2048
#: with more inputs than this, ``XᵀX`` of one regression is accumulated by row blocks, lower triangle only (about
#: 35% less time on resnet50's widest layers); ``augmented`` restores the rest
_BLOCKED_FROM = 512


def _block(n: int) -> int:
    return 512 if n > 2048 else 256


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` (batched when 3-d), the product in ``a``'s dtype and the sum in ``acc``'s."""
    if a.dtype == acc.dtype:
        (acc.addmm_ if a.dim() == 2 else acc.baddbmm_)(a, b)
    else:
        acc += (a @ b).to(acc.dtype)


def _symmetric(a: torch.Tensor) -> torch.Tensor:
    """The symmetric matrices (batched) whose lower triangles are those of ``a``."""
    return torch.tril(a) + torch.tril(a, -1).transpose(1, 2)


class Gram:
    """Normal equations of ``groups`` independent regressions with ``n_in`` inputs (plus a bias) and ``n_out``
    outputs each."""

    def __init__(self, groups: int, n_in: int, n_out: int, device: torch.device | str = "cpu",
                 products: torch.dtype = torch.float32) -> None:
        if products not in (torch.float32, torch.float64):
            raise ValueError(f"Gram products must be torch.float32 or torch.float64, got {products}")
        self.products = products
        f64 = {"dtype": torch.float64, "device": device}
        self.xx = torch.zeros(groups, n_in, n_in, **f64)
        self.xsum = torch.zeros(groups, n_in, **f64)
        self.xy = torch.zeros(groups, n_in, n_out, **f64)
        self.ysum = torch.zeros(groups, n_out, **f64)
        self.yy = torch.zeros(groups, **f64)
        self.rows = torch.zeros(1, **f64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold in rows ``x`` ``[groups, R, n_in]`` with targets ``y`` ``[groups, R, n_out]``."""
        r = x.shape[1]
        step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[2]))
        if self.products != torch.float64:
            step = min(step, _PRODUCT_ROWS)
        for lo in range(0, r, step):
            xc = x[:, lo:lo + step].to(self.products)
            yc = y[:, lo:lo + step].to(self.products)
            if xc.shape[0] == 1:  # one regression: plain GEMMs, faster than a batch of one
                x0, n = xc[0], xc.shape[2]
                if n > _BLOCKED_FROM:
                    for i0 in range(0, n, _block(n)):
                        i1 = min(n, i0 + _block(n))
                        _accumulate(self.xx[0, i0:i1, :i1], x0[:, i0:i1].T, x0[:, :i1])
                else:
                    _accumulate(self.xx[0], x0.T, x0)
                _accumulate(self.xy[0], x0.T, yc[0])
            else:
                _accumulate(self.xx, xc.transpose(1, 2), xc)
                _accumulate(self.xy, xc.transpose(1, 2), yc)
            self.xsum += xc.sum(1)  # summed in the chunk's dtype, added in float64 (as the products)
            self.ysum += yc.sum(1)
            self.yy += yc.square().sum((1, 2))
        self.rows += r

    def reduce(self) -> None:
        """Sum the statistics over every ``torch.distributed`` rank (no-op in one process)."""
        distributed.all_reduce_sum_many([self.xx, self.xsum, self.xy, self.ysum, self.yy, self.rows])

    def augmented(self, lower: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``[X, 1]ᵀ[X, 1]`` and ``[X, 1]ᵀY``: ``[groups, n_in + 1, n_in + 1]`` and ``[groups, n_in + 1, n_out]``.
        With ``lower``, only the lower triangle of the first is valid (all that a Cholesky factorization reads)."""
        g, n = self.xsum.shape
        a = self.xx.new_empty(g, n + 1, n + 1)
        a[:, :n, :n] = self.xx if lower else _symmetric(self.xx)
        a[:, :n, n] = self.xsum
        a[:, n, :n] = self.xsum
        a[:, n, n] = self.rows
        return a, torch.cat([self.xy, self.ysum[:, None, :]], 1)

    def ridge_lambda(self, ridge: float) -> torch.Tensor:
        """``ridge · mean(diag(XᵀX))`` per group (``ridge`` itself where the inputs are all zero)."""
        energy = torch.diagonal(self.xx, dim1=1, dim2=2).mean(1)
        return torch.where(energy > 0, ridge * energy, torch.full_like(energy, ridge))

    def solve(self, w0: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
        """The ridge solution ``[groups, n_in + 1, n_out]`` (last row: bias), pulled towards ``w0`` (same shape), and
        its squared residual ``||[X, 1] W - Y||²`` on the accumulated rows (from the statistics alone)."""
        a, b = self.augmented(lower=True)
        lam = self.ridge_lambda(ridge)
        w0 = w0.to(torch.float64)
        torch.diagonal(a, dim1=1, dim2=2).add_(lam[:, None])
        b_reg = b + lam[:, None, None] * w0
        chol, info = torch.linalg.cholesky_ex(a)  # reads the lower triangle only
        if bool((info == 0).all()):  # two triangular solves: faster on CPU than cholesky_solve
            half = torch.linalg.solve_triangular(chol, b_reg, upper=False)
            w = torch.linalg.solve_triangular(chol.transpose(1, 2), half, upper=True)
        else:  # not positive definite in floating point: a least-squares solve
            w = torch.linalg.lstsq(_symmetric(a), b_reg).solution
        # (A + λI) W = B + λ W0 gives Wᵀ A W = Wᵀ B + λ Wᵀ (W0 - W): no product with A is needed
        quad = (w * b).sum() + (lam[:, None, None] * w * (w0 - w)).sum()
        return w, float((quad - 2 * (w * b).sum() + self.yy.sum()).clamp_min(0))

    def error(self, w: torch.Tensor) -> float:
        """``||[X, 1] W - Y||²`` summed over groups, from the statistics alone (one product with ``XᵀX``)."""
        a, b = self.augmented()
        w = w.to(torch.float64)
        return float(((w * (a @ w)).sum() - 2 * (w * b).sum() + self.yy.sum()).clamp_min(0))


__all__ = ["Gram"]
