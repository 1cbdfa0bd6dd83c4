"""What the channel stages do for ``target: {"latency": f}`` and ``round_to: "auto"``.

- ``latency_table`` measures the per-layer lookup table of the analysed graph (``fxprune.latency.LatencyTable``) and
  calibrates it with one end-to-end timing of the graph on the example inputs (their device, dtype and batch size,
  at the current thread count), so its prediction covers what the table's layers leave out.
- ``resolve_budget`` turns ``round_to: "auto"`` into one step per group (``Budget.group_round_to``), read off the
  table (``LatencyTable.step``); the stage records the choice in ``Plan.round_to``.
- ``corrected`` checks a latency plan end to end: the pruned graph and the unpruned one are timed interleaved, and
  while the measured ratio misses the requested one by more than ``TOLERANCE`` the planner is re-run against a
  target scaled by measured / predicted (at most ``MAX_CORRECTIONS`` times, within ``MAX_SHIFT`` of the request).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Collection

import numpy as np
import torch.fx as fx

from ..analysis import Analysis
from ..errors import BudgetError
from ..latency import LatencyTable, model_ms
from ..passes.shrink_channels import ShrinkChannels
from ..planner import Budget, Planner, group_key

log = logging.getLogger(__name__)

TOLERANCE = 0.03
MAX_CORRECTIONS = 3
MAX_SHIFT = 0.1  # a correction moves the planned fraction by at most this much from the requested one


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


def corrected(gm: fx.GraphModule, planner: Planner, removed: np.ndarray, rel: float,
              inputs: tuple) -> tuple[np.ndarray, dict[str, float]]:
    """``removed`` (planned for the fraction ``rel`` of ``gm``'s latency), corrected until the pruned graph's
    measured latency ratio is within ``TOLERANCE`` of ``1 - rel``; returns the units and the latency stats."""
    table = planner.latency
    assert table is not None
    wanted = 1.0 - rel
    internal = rel
    corrections = 0
    while True:
        trial = copy.deepcopy(gm)
        ShrinkChannels(planner.plan(removed), inputs, planner.a)(trial)
        dense_ms, pruned_ms = model_ms([gm, trial], inputs)
        del trial
        measured = pruned_ms / dense_ms if dense_ms else 1.0
        predicted = table.predict(planner.new_sizes(removed)) / table.base_ms if table.base_ms else 1.0
        log.info("latency target: requested %.3f of the latency, predicted %.3f, measured %.3f (%.2f of %.2f ms)",
                 wanted, predicted, measured, pruned_ms, dense_ms)
        if abs(measured - wanted) <= TOLERANCE * wanted or corrections >= MAX_CORRECTIONS:
            break
        retarget = 1.0 - min(0.999, max(0.0, predicted * wanted / measured))
        retarget = min(max(retarget, rel - MAX_SHIFT), rel + MAX_SHIFT)  # a noisy timing must not run away
        try:
            candidate = planner.solve("latency", retarget)
        except BudgetError as exc:
            log.warning("latency correction stopped: %s", exc)
            break
        corrections += 1
        if np.array_equal(np.sort(candidate), np.sort(removed)):
            break
        removed, internal = candidate, retarget
    stats = {"latency_base_ms": dense_ms, "latency_measured_ms": pruned_ms, "latency_measured_ratio": measured,
             "latency_predicted_ratio": predicted, "latency_predicted_ms": predicted * dense_ms,
             "latency_requested_ratio": wanted, "latency_planned_ratio": 1.0 - internal,
             "latency_corrections": corrections,
             "latency_table_s": table.build_s}
    return removed, stats


__all__ = ["latency_table", "resolve_budget", "corrected", "TOLERANCE", "MAX_CORRECTIONS"]
