"""What the channel stages do for ``target: {"latency": f}`` and ``round_to: "auto"``.

- ``latency_table`` measures the per-layer lookup table of the analysed graph (``fxprune.latency.LatencyTable``) and
  calibrates it with one end-to-end timing of the graph on the example inputs (their device, dtype and batch size,
  at the current thread count), so its prediction covers what the table's layers leave out.
- ``resolve_budget`` turns ``round_to: "auto"`` into one step per group (``Budget.group_round_to``), read off the
  table (``LatencyTable.step``); the stage records the choice in ``Plan.round_to``.
- ``corrected`` checks a latency plan end to end: the pruned graph and the unpruned one are timed interleaved, and
  while the measured ratio misses the requested one by more than ``TOLERANCE`` the planner is re-run against a
  new planned fraction (``next_target``: scaling, then secant, then bisection-like regula falsi once two tries
  bracket the request; at most ``MAX_CORRECTIONS`` times, within ``MAX_SHIFT`` of the request), and the try whose
  measured ratio is closest to the request wins.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Collection, Sequence

import numpy as np
import torch.fx as fx

from ..analysis import Analysis
from ..errors import BudgetError
from ..latency import LatencyTable, model_ms
from ..passes.shrink_channels import ShrinkChannels
from ..planner import Budget, Planner, group_key

log = logging.getLogger(__name__)

TOLERANCE = 0.03
MAX_CORRECTIONS = 5
MAX_SHIFT = 0.15  # a correction moves the planned fraction by at most this much from the requested one


def latency_table(a: Analysis, budget: Budget, inputs: tuple, calibrate: bool = True) -> LatencyTable:
    """The measured lookup table of ``a``'s graph, its grid on the budget's ``round_to`` (in channels); calibrated
    end to end on ``inputs`` unless ``calibrate`` is false."""
    step = 1 if budget.round_units else max(1, budget.round_to)
    table = LatencyTable(a, step_of=lambda space: step)
    if calibrate:
        table.calibrate(model_ms([a.gm], inputs)[0])
    return table


def resolve_budget(a: Analysis, budget: Budget, round_to: object, table: LatencyTable | None,
                   groups: Collection[int] | None) -> Budget:
    """``budget`` with one ``round_to`` step per group when ``round_to`` is ``"auto"`` (else unchanged)."""
    if round_to != "auto":
        return budget
    if table is None:
        raise BudgetError("round_to 'auto' needs the latency lookup table")
    steps = {}
    for g in a.prunable_groups():
        if groups is not None and g not in groups:
            continue
        members = np.flatnonzero(a.space_group == g)
        width = int(max(a.sizes[i] for i in members))
        steps[group_key(a, g)] = table.step([a.spaces[i] for i in members], limit=max(1, width // 4))
    log.info("round_to auto: steps %s", dict(sorted(_histogram(steps.values()).items())))
    return dataclasses.replace(budget, round_to=1, group_round_to=steps)


def _histogram(values: Collection[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def next_target(tried: Sequence[tuple[float, float]], wanted: float, rel: float, predicted: float) -> float:
    """The next planned fraction to try, from the (planned fraction, measured ratio) pairs ``tried`` so far.

    The measured ratio falls as the planned fraction grows. With a pair on each side of ``wanted``, the closest two
    bracket it and the next try interpolates between them (regula falsi, kept inside the bracket's middle 80%, so
    that noise cannot stall it at one end). Without a bracket, the first step scales by measured / predicted and
    later steps go along the secant of the last two tries (or the scaling when their slope is not negative). Every
    step stays within ``MAX_SHIFT`` of the request ``rel``."""
    above = [(t, m) for t, m in tried if m > wanted]  # too slow: remove more
    below = [(t, m) for t, m in tried if m <= wanted]
    if above and below:
        t0, m0 = max(above)  # the largest fraction still too slow
        t1, m1 = min(below)  # the smallest fraction fast enough
        if t1 > t0:
            t = t0 + (t1 - t0) * (m0 - wanted) / (m0 - m1) if m0 != m1 else 0.5 * (t0 + t1)
            return min(max(t, t0 + 0.1 * (t1 - t0)), t0 + 0.9 * (t1 - t0))
    t_last, m_last = tried[-1]
    t = 1.0 - predicted * wanted / m_last if m_last else t_last
    if len(tried) > 1:
        (ta, ma), (tb, mb) = tried[-2], tried[-1]
        if tb != ta and (mb - ma) / (tb - ta) < 0:
            t = tb + (wanted - mb) * (tb - ta) / (mb - ma)
    t = min(0.999, max(0.0, t))
    return min(max(t, rel - MAX_SHIFT), rel + MAX_SHIFT)  # a noisy timing must not run away


def corrected(gm: fx.GraphModule, planner: Planner, removed: np.ndarray, rel: float,
              inputs: tuple) -> tuple[np.ndarray, dict[str, float]]:
    """``removed`` (planned for the fraction ``rel`` of ``gm``'s latency), corrected until the pruned graph's
    measured latency ratio is within ``TOLERANCE`` of ``1 - rel``; returns the units closest to the request among
    those tried, and the latency stats."""
    table = planner.latency
    assert table is not None
    wanted = 1.0 - rel
    internal = rel
    tried: list[tuple[float, float]] = []
    results: list[tuple[float, np.ndarray, dict[str, float]]] = []
    while True:
        trial = copy.deepcopy(gm)
        ShrinkChannels(planner.plan(removed), inputs, planner.a)(trial)
        dense_ms, pruned_ms = model_ms([gm, trial], inputs)
        del trial
        measured = pruned_ms / dense_ms if dense_ms else 1.0
        predicted = table.predict(planner.new_sizes(removed)) / table.base_ms if table.base_ms else 1.0
        log.info("latency target: requested %.3f of the latency, planned %.3f, predicted %.3f, measured %.3f "
                 "(%.2f of %.2f ms)", wanted, 1.0 - internal, predicted, measured, pruned_ms, dense_ms)
        tried.append((internal, measured))
        results.append((abs(measured - wanted), removed, {
            "latency_base_ms": dense_ms, "latency_measured_ms": pruned_ms, "latency_measured_ratio": measured,
            "latency_predicted_ratio": predicted, "latency_predicted_ms": predicted * dense_ms,
            "latency_planned_ratio": 1.0 - internal}))
        if abs(measured - wanted) <= TOLERANCE * wanted or len(tried) > MAX_CORRECTIONS:
            break
        retarget = next_target(tried, wanted, rel, predicted)
        try:
            candidate = planner.solve("latency", retarget)
        except BudgetError as exc:
            log.warning("latency correction stopped: %s", exc)
            break
        if any(np.array_equal(np.sort(candidate), np.sort(r)) for _, r, _ in results):
            break
        removed, internal = candidate, retarget
    _, removed, stats = min(results, key=lambda r: r[0])
    stats.update(latency_requested_ratio=wanted, latency_corrections=len(tried) - 1, latency_table_s=table.build_s)
    return removed, stats


__all__ = ["latency_table", "resolve_budget", "corrected", "next_target", "TOLERANCE", "MAX_CORRECTIONS"]
