"""Rate-distortion allocation of removed blocks across layers with one slope (LPViT's lambda search).

Layer ``l`` removes its blocks in increasing score order. Removing the first ``k`` costs
``D_l(k) = sum of the first k distortions`` and saves ``k * r_l`` (MACs or weights per block). For a slope
``lam`` every layer picks ``k_l(lam) = argmin_k D_l(k) - lam * r_l * k`` (the point of its curve where the slope
crosses ``lam``; the largest such ``k`` on ties), so the total saving grows with ``lam``. ``lam`` is bisected until
the saving meets the target; because curves are discrete, the remaining gap is filled block by block with the
cheapest next blocks (distortion per unit saved) among those the two bracketing slopes disagree on.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import BudgetError

log = logging.getLogger(__name__)


@dataclass
class LayerCurve:
    """One layer: block order (flat indices, lowest score first), distortions in that order, rate per block,
    and the most blocks it may lose."""

    order: np.ndarray
    cost: np.ndarray
    rate: float
    k_max: int

    @classmethod
    def from_scores(cls, score: torch.Tensor, distortion: torch.Tensor, rate: float, max_sparsity: float) -> LayerCurve:
        flat_score = score.detach().double().reshape(-1).cpu().numpy()
        order = np.argsort(flat_score, kind="stable")
        cost = np.clip(distortion.detach().double().reshape(-1).cpu().numpy()[order], 0.0, None)
        return cls(order, cost, float(rate), int(np.floor(max_sparsity * len(order) + 1e-9)))

    @property
    def curve(self) -> np.ndarray:
        """``D(k)`` for ``k = 0 .. k_max``."""
        return np.concatenate([[0.0], np.cumsum(self.cost[: self.k_max])])

    def removed_at(self, lam: float) -> int:
        d = self.curve
        objective = d - lam * self.rate * np.arange(len(d))
        best = objective.min()
        # the largest k whose objective ties with the minimum (relative tolerance for float noise)
        tol = 1e-12 * max(1.0, abs(best), float(d[-1]))
        return int(np.flatnonzero(objective <= best + tol)[-1])


def _saving(curves: list[LayerCurve], ks: list[int]) -> float:
    return float(sum(c.rate * k for c, k in zip(curves, ks)))


def allocate(curves: list[LayerCurve], target: float, *, iterations: int = 100) -> tuple[list[int], float]:
    """Blocks to remove per layer so that the total saving is as close as possible to ``target``.

    Returns ``(k per layer, slope lambda)``. Raises ``BudgetError`` if ``target`` exceeds what the ``k_max``
    limits allow.
    """
    most = _saving(curves, [c.k_max for c in curves])
    if target > most * (1 + 1e-9):
        raise BudgetError(f"the target saving {target:.4g} exceeds the {most:.4g} that removing max_sparsity of "
                          f"every chosen layer's blocks gives")
    if target <= 0:
        return [0] * len(curves), 0.0
    lo, hi = 0.0, max(float(c.curve[-1]) / c.rate for c in curves if c.rate > 0) * 2 + 1.0
    k_lo = [c.removed_at(lo) for c in curves]
    k_hi = [c.removed_at(hi) for c in curves]
    if _saving(curves, k_lo) >= target:
        hi, k_hi = lo, k_lo
    for _ in range(iterations):
        if _saving(curves, k_hi) - _saving(curves, k_lo) <= 0 or hi - lo <= 1e-15 * hi:
            break
        mid = 0.5 * (lo + hi)
        k_mid = [c.removed_at(mid) for c in curves]
        if _saving(curves, k_mid) >= target:
            hi, k_hi = mid, k_mid
        else:
            lo, k_lo = mid, k_mid
    ks = list(k_lo)
    if _saving(curves, ks) < target:
        ks = _fill(curves, ks, k_hi, target)
    log.debug("blocksparse: slope %.4g removes %s blocks (saving %.4g of target %.4g)", hi, ks, _saving(curves, ks),
              target)
    return ks, hi


def _fill(curves: list[LayerCurve], ks: list[int], upper: list[int], target: float) -> list[int]:
    """Add the cheapest next blocks (up to ``upper`` per layer) until the saving reaches ``target``; keep the
    step before or after crossing it, whichever lands closer."""
    ks = list(ks)
    heap = [(c.cost[k] / c.rate, i) for i, (c, k) in enumerate(zip(curves, ks)) if k < upper[i]]
    heapq.heapify(heap)
    saving = _saving(curves, ks)
    while heap and saving < target:
        _, i = heapq.heappop(heap)
        c = curves[i]
        if saving + c.rate - target > target - saving:  # would overshoot by more than we fall short
            continue
        ks[i] += 1
        saving += c.rate
        if ks[i] < upper[i]:
            heapq.heappush(heap, (c.cost[ks[i]] / c.rate, i))
    return ks


def keep_mask(curve: LayerCurve, removed: int, grid: tuple[int, int]) -> torch.Tensor:
    """Bool ``[block rows, block columns]``: True for the blocks that stay."""
    keep = np.ones(len(curve.order), dtype=bool)
    keep[curve.order[:removed]] = False
    return torch.from_numpy(keep.reshape(grid))
