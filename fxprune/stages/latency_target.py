"""What the channel stages do for ``target: {"latency": f}`` and ``round_to: "auto"``.

- ``latency_table`` measures the per-layer lookup table of the analysed graph (``fxprune.latency.LatencyTable``);
  ``calibrate`` weighs the table by the nodes' times inside the graph (``latency.node_ms``: each layer's level,
  each other node's cost per element) and fits the constant to an end-to-end timing on the example inputs (their
  device, dtype and batch size, at the current thread count): so the part of the rest that shrinks with the
  widths (norms, activations, pooling, adds) is told apart from the part that does not (the interpreter, per-call
  costs, fixed-size ops). A table with nothing to weigh by fits its cost per element on a second timing, of the
  graph pruned by the planner's MACs plan at the requested fraction (a probe).
- The request is about the model as the user calls it (``ScoreContext.reference``, the first stage only), which
  ``calibrate`` times in the same rounds as the traced graph: ``graph_ratio`` turns it into a ratio of the traced
  graph for the kind of result ``compile`` returns, and ``in_user_terms`` states the plan's stats back as ratios to
  the user's model.
- ``resolve_budget`` turns ``round_to: "auto"`` into one step per group (``Budget.group_round_to``), read off the
  table (``LatencyTable.step``); the stage records the choice in ``Plan.round_to``.
- ``corrected`` checks a latency plan end to end: the pruned graph and the unpruned one are timed interleaved, and
  while the measured ratio misses the requested one by more than ``TOLERANCE`` (a try within it is re-timed and
  judged on the pooled rounds; one that stays beyond half of it gets one more try) the planner is re-run against a
  new planned fraction (``next_target``: a line fitted to the tries so far, then regula falsi once two tries
  bracket the request; at most ``MAX_CORRECTIONS`` times, within ``MAX_SHIFT`` of the request), and the try whose
  measured ratio is closest to the request wins.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch.fx as fx

from ..analysis import Analysis
from ..errors import BudgetError
from ..latency import LatencyTable, node_ms, round_ratios
from ..passes.shrink_channels import ShrinkChannels
from ..planner import Budget, Planner, group_key

log = logging.getLogger(__name__)

TOLERANCE = 0.03
MAX_CORRECTIONS = 5
MAX_SHIFT = 0.2  # a correction moves the planned fraction by at most this much from the requested one
REPEATS = 9  # interleaved rounds of each end-to-end timing
TIMING_S = 2.0  # a timing whose median ratio is less precise than TOLERANCE / 2 gets more rounds, up to this long


def latency_table(a: Analysis, budget: Budget) -> LatencyTable:
    """The measured lookup table of ``a``'s graph, its grid on the budget's ``round_to`` (in channels), not yet
    calibrated (``calibrate``)."""
    step = 1 if budget.round_units else max(1, budget.round_to)
    return LatencyTable(a, step_of=lambda space: step)


def _pruned_copy(gm: fx.GraphModule, planner: Planner, removed: np.ndarray, inputs: tuple) -> fx.GraphModule:
    """A copy of ``gm`` shrunk by the planner's plan for the units ``removed`` (``gm`` is left as it is)."""
    trial = copy.deepcopy(gm)
    ShrinkChannels(planner.plan(removed), inputs, planner.a)(trial)
    return trial


def calibrate(gm: fx.GraphModule, planner: Planner, fraction: float, inputs: tuple,
              reference: Callable[..., Any] | None = None) -> float:
    """Weigh ``planner``'s table's entries by their times inside ``gm`` and calibrate it on ``gm`` timed on
    ``inputs``. Where the weighing found nothing to go by, the calibration also times ``gm`` pruned by the planner's
    plan removing ``fraction`` of its MACs (the probe), interleaved, to fit the cost per element.

    Returns the reference ratio: ``gm``'s time over ``reference``'s (the model as the user calls it, timed in the
    same rounds; ``graph_ratio`` turns a request about the user's model into one about ``gm``), 1.0 without one."""
    table = planner.latency
    assert table is not None
    table.weigh(node_ms(gm, inputs, [e.node for e in table.entries]))  # before the fit
    models: list[Callable[..., Any]] = [gm]
    probe = np.zeros(0, np.int64)
    if fraction > 0 and not table.rate:  # an unweighed table fits its cost per element on a second timing
        try:
            probe = planner.solve("flops", min(fraction, 0.9))
        except BudgetError as exc:
            log.info("latency calibration without a probe: %s", exc)
    if len(probe):
        models.append(_pruned_copy(gm, planner, probe, inputs))
    if reference is not None:
        models.append(reference)
    rounds, samples = round_ratios(models, inputs, repeats=REPEATS, precision=TOLERANCE / 2, max_s=TIMING_S)
    times, ratios = [statistics.median(t) for t in rounds], [statistics.median(r) for r in samples]
    points: list[tuple[dict, float]] = [({}, times[0])]
    if len(probe):
        points.append((planner.new_sizes(probe), ratios[1] * times[0]))
    table.calibrate(points)
    if reference is None:
        return 1.0
    ratio = statistics.median(1.0 / r for r in samples[-1])  # per round: gm over the reference
    log.info("latency reference: the traced graph takes %.3f of the model's time (%.2f vs %.2f ms)", ratio,
             times[0], times[-1])
    return ratio


def graph_ratio(wanted: float, reference: float, output: str = "graph") -> float:
    """The latency ratio to the unpruned traced graph at which the result keeps ``wanted`` of the user's model's
    latency, where the unpruned graph takes ``reference`` times the model's (``calibrate``).

    The graph's own overhead over the model (``reference - 1`` of the model's time: its attribute lookups and calls
    per node) does not shrink with the channels. A ``"graph"`` result keeps it, so the graph must reach ``wanted /
    reference``; a ``"module"`` result (the model's own forward) sheds it, so the pruned graph may keep it on top:
    ``(wanted + reference - 1) / reference``. Kept within [0.01, 1]."""
    if reference <= 0:
        raise ValueError(f"reference ratio must be positive, got {reference}")
    ratio = (wanted + reference - 1.0) / reference if output == "module" else wanted / reference
    return min(1.0, max(0.01, ratio))


def user_ratio(graph: float, reference: float, output: str = "graph") -> float:
    """``graph_ratio``'s inverse: the latency ratio to the user's model of a result whose graph measured ``graph``
    of the unpruned graph's latency."""
    return graph * reference - (reference - 1.0) if output == "module" else graph * reference


def in_user_terms(stats: dict[str, float], base_ms: float, wanted: float, reference: float,
                  output: str) -> dict[str, float]:
    """``corrected``'s stats of the last step as ratios to the user's model: ``latency_measured_ratio``,
    ``latency_predicted_ratio`` and ``latency_planned_ratio`` from the last step's milliseconds over ``base_ms`` (the
    unpruned graph's, from the first step) through ``user_ratio``; ``latency_graph_ratio`` is the measured ratio to
    the unpruned graph, ``latency_reference_ratio`` the graph's time over the model's, ``latency_requested_ratio``
    ``wanted``."""
    step_base = stats["latency_base_ms"]
    graph = stats["latency_measured_ms"] / base_ms
    planned = stats["latency_planned_ratio"] * step_base / base_ms
    return {**stats, "latency_base_ms": base_ms, "latency_graph_ratio": graph,
            "latency_measured_ratio": user_ratio(graph, reference, output),
            "latency_predicted_ratio": user_ratio(stats["latency_predicted_ms"] / base_ms, reference, output),
            "latency_planned_ratio": user_ratio(planned, reference, output),
            "latency_reference_ratio": reference, "latency_requested_ratio": wanted}


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


def next_target(tried: Sequence[tuple[float, float, float]], wanted: float, rel: float) -> float:
    """The next planned fraction to try, from the (planned fraction, predicted ratio, measured ratio) triples
    ``tried`` so far.

    The measured ratio falls as the planned fraction grows. With a try on each side of ``wanted``, the closest two
    bracket it and the next try interpolates between them (regula falsi, kept inside the bracket's middle 80%, so
    that noise cannot stall it at one end). Without a bracket, a line fitted to every try by least squares (measured
    against planned; from one try, or tries too close together, the line through the unpruned model's (0, 1)
    scaled by the measured / predicted savings) says where ``wanted`` lies: fitting all tries averages their timing
    noise, where a secant through the last two would amplify it. Every step stays within ``MAX_SHIFT`` of the
    request ``rel``."""
    pairs = [(t, m) for t, _, m in tried]
    above = [(t, m) for t, m in pairs if m > wanted]  # too slow: remove more
    below = [(t, m) for t, m in pairs if m <= wanted]
    if above and below:
        t0, m0 = max(above)  # the largest fraction still too slow
        t1, m1 = min(below)  # the smallest fraction fast enough
        if t1 > t0:
            t = t0 + (t1 - t0) * (m0 - wanted) / (m0 - m1) if m0 != m1 else 0.5 * (t0 + t1)
            return min(max(t, t0 + 0.1 * (t1 - t0)), t0 + 0.9 * (t1 - t0))
    ts = np.array([t for t, _ in pairs])
    ms = np.array([m for _, m in pairs])
    t = float("nan")
    if len(pairs) > 1 and np.ptp(ts) >= 0.02:
        slope, intercept = np.polyfit(ts, ms, 1)
        if slope < 0:
            t = (wanted - intercept) / slope
    if not np.isfinite(t):
        saved = np.array([1.0 - p for _, p, _ in tried])
        gain = float(saved @ (1.0 - ms) / (saved @ saved)) if saved @ saved > 0 else 1.0
        t_last, p_last, _ = tried[-1]
        t = t_last + (p_last - (1.0 - (1.0 - wanted) / gain)) if gain > 0 else t_last + MAX_SHIFT
    t = min(0.999, max(0.0, t))
    return min(max(t, rel - MAX_SHIFT), rel + MAX_SHIFT)  # a noisy timing must not run away


def _timed(gm: fx.GraphModule, trial: fx.GraphModule, inputs: tuple,
           wanted: float) -> tuple[list[float], list[float]]:
    """``gm``'s milliseconds and ``trial``'s per-round ratios to them, over ``REPEATS`` interleaved rounds, more
    while the median ratio is less precise than half the tolerance around ``wanted`` (for at most ``TIMING_S``)."""
    times, ratios = round_ratios([gm, trial], inputs, repeats=REPEATS, precision=TOLERANCE * wanted / 2,
                                 max_s=TIMING_S)
    return times[0], ratios[1]


def corrected(gm: fx.GraphModule, planner: Planner, rel: float,
              inputs: tuple) -> tuple[np.ndarray, dict[str, float]]:
    """The planner's plan for the fraction ``rel`` of ``gm``'s latency, corrected until the pruned graph's
    measured latency ratio is within ``TOLERANCE`` of ``1 - rel``; returns the units closest to the request among
    those tried, and the latency stats. A try within ``TOLERANCE`` but not within half of it gets one more try
    towards the request: a result accepted at the tolerance's edge would leave the next timing's noise no room.

    When the table predicts ``rel`` out of reach, its most-pruned plan (``Planner.latency_floor``) is measured
    instead: the prediction may be pessimistic (a noisy calibration). If that plan also misses the request by more
    than ``TOLERANCE`` and is too slow, the ``BudgetError`` is raised with what was measured.

    Each try is timed against ``gm`` in interleaved rounds, its ratio the median of the per-round ratios
    (``round_ratios``); a try that lands within ``TOLERANCE`` is timed once more and judged on the pooled rounds,
    so that one lucky timing does not end the search (the closest of several noisy tries is biased towards the
    request)."""
    table = planner.latency
    assert table is not None
    wanted = 1.0 - rel
    internal = rel
    try:
        removed = planner.solve("latency", rel)
        short: BudgetError | None = None
    except BudgetError as exc:
        short, removed = exc, planner.latency_floor()
        internal = planner.reduction(removed, "latency")
        log.info("latency target: %s; measuring the table's most-pruned plan (predicted %.3f)", exc, 1 - internal)
    tried: list[tuple[float, float, float]] = []
    results: list[tuple[float, np.ndarray, dict[str, float]]] = []
    refined = False
    while True:
        trial = _pruned_copy(gm, planner, removed, inputs)
        dense, samples = _timed(gm, trial, inputs, wanted)
        if abs(statistics.median(samples) - wanted) <= TOLERANCE * wanted:  # confirm before accepting
            more_dense, more = _timed(gm, trial, inputs, wanted)
            dense, samples = dense + more_dense, samples + more
        dense_ms, measured = statistics.median(dense), statistics.median(samples)
        predicted = table.predict(planner.new_sizes(removed)) / table.base_ms if table.base_ms else 1.0
        log.info("latency target: requested %.3f of the latency, planned %.3f, predicted %.3f, measured %.3f "
                 "(%.2f of %.2f ms, %d rounds)", wanted, 1.0 - internal, predicted, measured, measured * dense_ms,
                 dense_ms, len(samples))
        tried.append((internal, predicted, measured))
        error = abs(measured - wanted)
        results.append((error, removed, {
            "latency_base_ms": dense_ms, "latency_measured_ms": measured * dense_ms,
            "latency_measured_ratio": measured, "latency_predicted_ratio": predicted,
            "latency_predicted_ms": predicted * dense_ms, "latency_planned_ratio": float(1.0 - internal)}))
        if error <= TOLERANCE * wanted / 2 or refined or len(tried) > MAX_CORRECTIONS:
            break
        refined = error <= TOLERANCE * wanted  # within the tolerance, off centre: one more try, the closest wins
        if short is not None:
            if measured > wanted and refined:  # within the tolerance, and no plan prunes more
                break
            if measured > wanted:  # the most-pruned plan is too slow: the target is out of reach
                raise BudgetError(f"{short}; measured, that plan keeps {measured:.3f} of the latency "
                                  f"(requested {wanted:.3f})") from short
            short = None
        retarget = next_target(tried, wanted, rel)
        try:
            candidate = planner.solve("latency", retarget)
        except BudgetError as exc:
            log.warning("latency correction stopped: %s", exc)
            break
        if any(np.array_equal(np.sort(candidate), np.sort(r)) for _, r, _ in results):
            break
        removed, internal = candidate, retarget
    _, removed, stats = min(results, key=lambda r: r[0])
    stats.update(latency_requested_ratio=float(wanted), latency_corrections=len(tried) - 1,
                 latency_table_s=table.build_s)
    return removed, stats


__all__ = ["latency_table", "calibrate", "graph_ratio", "user_ratio", "in_user_terms", "resolve_budget", "corrected",
           "next_target", "TOLERANCE", "MAX_CORRECTIONS", "MAX_SHIFT"]
