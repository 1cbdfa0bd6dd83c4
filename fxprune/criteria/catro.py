"""CATRO: class-aware trace-ratio channel selection, turned into a per-unit removal order.

Source: Hu et al., "CATRO: Channel Pruning via Class-Aware Trace Ratio Optimization", arXiv 2110.10921 (no code
found). From a few labeled samples per class, each channel's features give a within-class scatter ``S_w`` and a
between-class scatter ``S_b``; the kept set ``S`` maximizes ``J(S) = tr(S_b[S]) / tr(S_w[S])``, solved by the
iterative trace-ratio method: ``lambda <- J(S)``, ``S <- top-k of diag(S_b) - lambda * diag(S_w)``, until
``lambda`` stops changing. Coupled channels share one decision (their features are pooled).

Our reading (not fixed by the paper):
- Features: a channel's feature on a sample is its response, averaged over every dim but batch and channel,
  in the tensors the next layers *read*: the node spaces tied to an input-channel parameter axis (axis 1). A
  unit (coupled channels: residual sums, concat slices) gets the features of all its such slots, and its terms
  are the block sums ``sb[u] = sum of diag(S_b)``, ``sw[u] = sum of diag(S_w)`` over them. A unit with no read
  slot falls back to all of its tensor slots.
- Only the traces of sub-matrices enter ``J``, so only the diagonals of the scatter matrices are computed.
- Stage 1 (per layer, every k): each group gets a *nested* order: from all units, for ``k = n - 1, ..., 1`` the
  trace-ratio iteration picks the best ``k``-subset of the previous set (it drops one unit).
- Stage 2 (layer rates under the budget): ``J`` itself is scale-free and not comparable across layers, so a unit's
  score is the fraction of its group's between-class scatter ``tr(S_b)`` lost once it and every unit dropped
  before it are gone (cumulative, so it grows along the nested order). These fractions are comparable across
  groups: with ``scope: "global"`` the planner removes, in every group, the prefix of its order that loses at
  most a common fraction ``t`` of discriminative scatter, and bisects ``t`` to meet the FLOPs / params budget, so
  groups get different rates. With ``scope: "local"`` every group loses the same fraction of units, in the nested
  order.
- Caveat, measured in ``bench/bench_criteria_digits.py``: ``J`` is scale-free per channel, so a weak channel
  with a good ratio outranks a strong channel the next layer relies on; on the digits models this order did
  worse than ``l2`` without fine-tuning.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..analysis import Analysis
from .base import ScoreContext, register_criterion
from .scatter import ClassMoments
from .taylor import iter_batches

log = logging.getLogger(__name__)


def class_scatter(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diagonals of the between-class and within-class scatter matrices of ``features[sample, feature]``.

    ``S_b = sum_c n_c (mu_c - mu)^2`` and ``S_w = sum_c sum_{i in c} (x_i - mu_c)^2``, per feature.
    """
    x = np.asarray(features, np.float64)
    mu = x.mean(0)
    sb = np.zeros(x.shape[1])
    sw = np.zeros(x.shape[1])
    for c in np.unique(labels):
        xc = x[labels == c]
        mc = xc.mean(0)
        sb += len(xc) * (mc - mu) ** 2
        sw += ((xc - mc) ** 2).sum(0)
    return sb, sw


def _ratio(sb: np.ndarray, sw: np.ndarray, keep: np.ndarray, eps: float) -> float:
    return float(sb[keep].sum() / (sw[keep].sum() + eps))


def trace_ratio(sb: np.ndarray, sw: np.ndarray, k: int, candidates: np.ndarray | None = None,
                max_iter: int = 100) -> tuple[np.ndarray, float]:
    """The ``k``-subset of ``candidates`` (bool mask; default all) maximizing ``sum(sb) / sum(sw)``, and its ratio.

    Iterative trace-ratio method: ``lambda <- J(S)``; ``S <- top-k of sb - lambda * sw``; stop when ``S`` or
    ``lambda`` no longer changes (``lambda`` increases monotonically).
    """
    cand = np.ones(len(sb), bool) if candidates is None else candidates.copy()
    eps = 1e-12 * max(float(sw.max(initial=0.0)), 1e-30)
    idx = np.flatnonzero(cand)
    keep, lam = cand, _ratio(sb, sw, cand, eps)
    for _ in range(max_iter):
        top = idx[np.argsort(-(sb[idx] - lam * sw[idx]), kind="stable")[:k]]
        new = np.zeros(len(sb), bool)
        new[top] = True
        new_lam = _ratio(sb, sw, new, eps)
        if keep.sum() == k and (np.array_equal(new, keep) or new_lam <= lam * (1 + 1e-12) + 1e-300):
            break  # converged: the set, or the (monotone) ratio, stopped changing
        keep, lam = new, new_lam
    return keep, lam


def elimination_order(sb: np.ndarray, sw: np.ndarray) -> np.ndarray:
    """Indices in the order they are dropped: each step keeps the best ``k - 1``-subset of the current set."""
    n = len(sb)
    keep = np.ones(n, bool)
    order = []
    for k in range(n - 1, 0, -1):
        new, _ = trace_ratio(sb, sw, k, keep)
        order.extend(np.flatnonzero(keep & ~new).tolist())
        keep = new
    order.extend(np.flatnonzero(keep).tolist())
    return np.asarray(order, np.int64)


class _Capture(fx.Interpreter):
    """Runs the graph and keeps, for each wanted node output, the response averaged over all but two dims."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, list[tuple[int, int]]], batch: int) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.batch = batch
        self.out: dict[tuple[str, int, int], torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        for item, dim in self.wanted.get(n.name, ()):
            t = result[item] if isinstance(result, (tuple, list)) else result
            if not isinstance(t, torch.Tensor) or dim == 0 or t.dim() <= dim or t.shape[0] != self.batch:
                continue
            c = t.shape[dim]
            self.out[(n.name, item, dim)] = t.detach().float().movedim(dim, -1).reshape(self.batch, -1, c).mean(1)
        return result


def _feature_slots(a: Analysis) -> np.ndarray:
    """Bool per slot: the slot is in a tensor space that an input-channel parameter axis reads."""
    read = np.zeros(len(a.spaces), bool)
    for i, j in a.graph.edges:
        for p, q in ((i, j), (j, i)):
            if a.spaces[p].is_param and a.spaces[p].dim == 1 and not a.spaces[q].is_param:
                read[q] = True
    slots = read[a.slot_space]
    tensor_slot = ~np.repeat([s.is_param for s in a.spaces], a.sizes)
    has_read = np.bincount(a.slot_unit, weights=slots, minlength=a.n_units) > 0
    return slots | (tensor_slot & ~has_read[a.slot_unit])  # fallback: every tensor slot of a unit with none read


def unit_scatter(a: Analysis, ctx: ScoreContext) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the block sums of diag(S_b) and diag(S_w) over the features of its slots (needs labeled data)."""
    use = _feature_slots(a)
    live_units = ~a.unit_frozen & np.isin(a.unit_group, a.prunable_groups())
    use &= live_units[a.slot_unit]
    wanted: dict[str, list[tuple[int, int]]] = defaultdict(list)
    spaces = np.unique(a.slot_space[use])
    for i in spaces:
        s = a.spaces[i]
        wanted[s.owner].append((s.item, s.dim))
    moments: dict[tuple[str, int, int], ClassMoments] = {
        (a.spaces[i].owner, a.spaces[i].item, a.spaces[i].dim): ClassMoments(int(a.sizes[i])) for i in spaces}
    gm, was_training = a.gm, a.gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for inputs, y in iter_batches(ctx, "catro", labels=True):
                cap = _Capture(gm, wanted, int(y.shape[0]))
                cap.run(*inputs)
                for key, t in cap.out.items():
                    moments[key].add(t, y)
    finally:
        gm.train(was_training)
    sb_slot = np.zeros(len(a.slot_unit))
    sw_slot = np.zeros(len(a.slot_unit))
    for i in spaces:
        s = a.spaces[i]
        got = moments[(s.owner, s.item, s.dim)]
        got.reduce()  # under torch.distributed: the moments of every rank's batches
        if not got.count.sum():
            log.debug("catro: no batch-shaped response for space %s", s.key())
            continue
        sb, sw = got.scatter()
        lo = int(a.offsets[i])
        sb_slot[lo:lo + len(sb)] = sb
        sw_slot[lo:lo + len(sw)] = sw
    sb_slot[~use] = 0.0
    sw_slot[~use] = 0.0
    return (np.bincount(a.slot_unit, weights=sb_slot, minlength=a.n_units),
            np.bincount(a.slot_unit, weights=sw_slot, minlength=a.n_units))


@register_criterion("catro")
class CATROCriterion:
    """Per group, the share of between-class scatter lost along the nested trace-ratio order (stage 1 + 2)."""

    comparable_across_groups = True  # fractions of each group's tr(S_b): ``global`` allocates layer rates with them

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        sb, sw = unit_scatter(analysis, ctx)
        scores = np.zeros(analysis.n_units)
        for g in analysis.prunable_groups():
            units = np.flatnonzero((analysis.unit_group == g) & ~analysis.unit_frozen)
            order = elimination_order(sb[units], sw[units])
            lost = np.cumsum(sb[units][order]) / max(float(sb[units].sum()), 1e-300)
            # strictly increasing along the order, so the planner keeps it (ties broken by rank)
            scores[units[order]] = lost + np.arange(1, len(units) + 1) * 1e-12
        return scores
