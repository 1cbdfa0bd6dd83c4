"""Streamed per-class moments of features, summed over ``torch.distributed`` ranks: the diagonals of the
between-class and within-class scatter matrices that ``catro`` ranks channels with, without holding features.

Per class ``c``: the count ``n_c``, ``Σ x`` and ``Σ x²`` of every feature, in float64. Then ``S_b = Σ_c n_c (μ_c -
μ)²`` and ``S_w = Σ_c (Σ x² - n_c μ_c²)`` per feature, equal to ``catro.class_scatter`` on the pooled features.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import distributed


class ClassMoments:
    """Running per-class count, sum and sum of squares of ``n_features`` features."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.count = torch.zeros(0, dtype=torch.float64)
        self.sum = torch.zeros(0, n_features, dtype=torch.float64)
        self.sumsq = torch.zeros(0, n_features, dtype=torch.float64)

    def _grow(self, classes: int) -> None:
        extra = classes - self.count.shape[0]
        if extra > 0:
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])
            self.sum = torch.cat([self.sum, self.sum.new_zeros(extra, self.n_features)])
            self.sumsq = torch.cat([self.sumsq, self.sumsq.new_zeros(extra, self.n_features)])

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold in ``features[sample, feature]`` of samples with integer ``labels`` (>= 0)."""
        x = features.detach().to("cpu", torch.float64)
        y = labels.reshape(-1).to("cpu", torch.int64)
        self._grow(int(y.max()) + 1 if len(y) else 0)
        self.count.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
        self.sum.index_add_(0, y, x)
        self.sumsq.index_add_(0, y, x * x)

    def reduce(self) -> None:
        """Sum over every rank (each may have seen different classes; no-op in one process)."""
        self._grow(distributed.all_reduce_max(self.count.shape[0]))
        distributed.all_reduce_sum_many([self.count, self.sum, self.sumsq])

    def scatter(self) -> tuple[np.ndarray, np.ndarray]:
        """Diagonals of ``S_b`` and ``S_w`` (see the module docstring)."""
        seen = self.count > 0
        n, s, sq = self.count[seen], self.sum[seen], self.sumsq[seen]
        mu_c = s / n[:, None]
        mu = s.sum(0) / n.sum()
        sb = (n[:, None] * (mu_c - mu) ** 2).sum(0)
        sw = (sq - n[:, None] * mu_c ** 2).sum(0).clamp_min(0)
        return sb.numpy(), sw.numpy()


__all__ = ["ClassMoments"]
