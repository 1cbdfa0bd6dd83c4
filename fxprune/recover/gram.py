"""Streamed float64 normal equations of a (batched) ridge regression ``Y ≈ [X, 1] W``.

``Gram.add`` folds in one batch of rows; only ``XᵀX``, ``Xᵀ1``, ``XᵀY``, ``1ᵀY``, ``ΣY²`` and the row count are
kept, so memory is independent of the number of calibration samples. ``Gram.reduce`` sums them over
``torch.distributed`` ranks, and ``Gram.solve`` returns

    W = argmin ||[X, 1] W - Y||² + λ ||W - W0||²,   λ = ridge · mean(diag(XᵀX)),

the ridge pulling towards the current weights ``W0`` (scale-free: ``ridge`` is relative to the mean input energy).
"""
from __future__ import annotations

import torch

from .. import distributed

#: rows folded in per matrix product: bounds the float64 copy of a chunk to about 32 MB
_CHUNK_ELEMENTS = 1 << 22
#: with more inputs than this, ``XᵀX`` of one regression is accumulated by row blocks, lower triangle only (about
#: 35% less time on resnet50's widest layers); ``augmented`` restores the rest
_BLOCKED_FROM = 512


def _block(n: int) -> int:
    return 512 if n > 2048 else 256


def _symmetric(a: torch.Tensor) -> torch.Tensor:
    """The symmetric matrices (batched) whose lower triangles are those of ``a``."""
    return torch.tril(a) + torch.tril(a, -1).transpose(1, 2)


class Gram:
    """Normal equations of ``groups`` independent regressions with ``n_in`` inputs (plus a bias) and ``n_out``
    outputs each."""

    def __init__(self, groups: int, n_in: int, n_out: int, device: torch.device | str = "cpu") -> None:
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
        for lo in range(0, r, step):
            xc = x[:, lo:lo + step].to(torch.float64)
            yc = y[:, lo:lo + step].to(torch.float64)
            if xc.shape[0] == 1:  # one regression: plain GEMMs, faster than a batch of one
                x0, n = xc[0], xc.shape[2]
                if n > _BLOCKED_FROM:
                    for i0 in range(0, n, _block(n)):
                        i1 = min(n, i0 + _block(n))
                        self.xx[0, i0:i1, :i1].addmm_(x0[:, i0:i1].T, x0[:, :i1])
                else:
                    self.xx[0].addmm_(x0.T, x0)
                self.xy[0].addmm_(x0.T, yc[0])
            else:
                self.xx.baddbmm_(xc.transpose(1, 2), xc)
                self.xy.baddbmm_(xc.transpose(1, 2), yc)
            self.xsum += xc.sum(1)
            self.ysum += yc.sum(1)
            self.yy += torch.linalg.vector_norm(yc, dim=(1, 2)).square()
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
        if bool((info == 0).all()):
            w = torch.cholesky_solve(b_reg, chol)
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
