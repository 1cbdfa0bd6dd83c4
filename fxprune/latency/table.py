"""The per-layer latency lookup table of an analysed graph: predicted milliseconds at any shrunk sizes.

Every layer that counts MACs is one entry. A layer with an ``OpModel`` (convolution, linear, attention) is timed
at a coarse grid of kept widths (``FRACTIONS`` of each width, on multiples of its ``round_to`` step, the full width
always included) and interpolated bilinearly in between; the grid values come from the shared cache
(``cache.measure_cached``: timed once per distinct op signature and shape, interleaved, on the device and dtype of
the layer's weights at the recorded input shapes, batch size included). Other layers (matmuls,
``nn.MultiheadAttention``) cost the table's mean milliseconds per MAC times their MACs.

What the whole model takes beyond those layers (norms, activations, pooling, adds, the interpreter) is modelled as
``residual_ms + ms_per_element * elements``: a constant, plus a cost per element of every other node's output
(*volume* entries, one per tensor-producing node; memory-bound ops cost about their output size). Elements are
weighted per node (``weigh``: a max-pool element costs tens of ReLU elements), from the node's time inside the
model (``volume.node_ms``), which also sets each layer's level (``Entry.factor``). ``calibrate`` then keeps that
measured cost per element and takes the constant from the unpruned graph's end-to-end time; an unweighed table
fits both terms to end-to-end measurements: the unpruned graph and, to separate the two terms, a pruned one.

``step(spaces)`` finds where a width's latency curve has its steps (``round_to: "auto"``): the layer's op is timed
at widths ``M + k`` just above a multiple ``M`` of 64 and the candidate step whose staircase fits the times best
(least squares) is taken, the smallest among near-ties.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..analysis import Analysis
from ..ir.context import SizeContext
from ..ir.space import Space
from ..ir.spec import TensorSpec, spec_of
from ..ops.registry import OpRule
from . import cache
from .ops import OpModel, op_model
from .volume import element_rates, node_kind

log = logging.getLogger(__name__)

FRACTIONS = (0.1, 0.4, 0.7, 1.0)
STEP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
STEP_OFFSETS = (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
#: ``measure(model, a, b) -> ms`` replaces timing (synthetic tables in tests)
Measure = Callable[[OpModel, int, int], float]


class _Recording(SizeContext):
    """A ``SizeContext`` that notes every space it is asked about (what a layer's widths depend on)."""

    def __init__(self, param_sizes: dict[Space, int]) -> None:
        super().__init__({}, param_sizes)
        self.seen: set[Space] = set()

    def shape(self, arg, item: int = 0) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
        out = super().shape(arg, item)
        self.seen.update(Space(arg.name, item, d) for d in range(len(out)))
        return out

    def size(self, space: Space) -> int:
        self.seen.add(space)
        return super().size(space)


@dataclass
class Entry:
    """One layer of the table."""

    node: str
    rule: OpRule | None  # None: a volume entry (``ms_per_element`` x ``weight`` per element of its output)
    model: OpModel | None
    macs: int
    deps: set[int]  # analysis space indices its widths (or MACs, or output size) depend on
    elements: int = 0  # a volume entry's output elements, unpruned
    weight: float = 1.0  # a volume entry's cost of an element relative to the typical volume node's (``weigh``)
    factor: float = 1.0  # a layer's in-model time over its table time at full size (``weigh``)
    grid: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    full_ms: float = 0.0


def grid_widths(full: int, step: int, fractions: Sequence[float] = FRACTIONS) -> np.ndarray:
    """Grid widths of one axis: each fraction of ``full`` on a multiple of ``step`` (at least ``step``), and
    ``full`` itself."""
    step = max(1, min(step, full))
    out = {full} | {min(full, max(step, int(round(f * full / step)) * step)) for f in fractions}
    return np.asarray(sorted(out), np.int64)


def _interp(grid: tuple[np.ndarray, np.ndarray], values: np.ndarray, a: float, b: float) -> float:
    ga, gb = grid
    rows = np.array([np.interp(a, ga, values[:, j]) for j in range(values.shape[1])])
    return float(rows[0]) if len(gb) == 1 else float(np.interp(b, gb, rows))


def _fit_step(widths: Sequence[int], ms: Sequence[float], candidates: Iterable[int]) -> int:
    """The candidate step whose staircase ``alpha + beta * ceil(w / s) * s`` fits ``ms`` best (smallest of
    near-ties: within 10% of the best residual)."""
    t = np.asarray(ms, np.float64)
    resid = {}
    for s in candidates:
        x = np.array([math.ceil(w / s) * s for w in widths], np.float64)
        design = np.stack([x, np.ones_like(x)], 1)
        coef = np.linalg.lstsq(design, t, rcond=None)[0]
        resid[s] = float(np.sum((design @ coef - t) ** 2))
    best = min(resid.values())
    return min(s for s, r in resid.items() if r <= best * 1.1 + 1e-18)


class LatencyTable:
    """Predicted latency of ``analysis``'s graph at any shrunk sizes (see the module docstring).

    Args:
        analysis: the analysed graph (shapes recorded at the example inputs).
        step_of: the ``round_to`` step of a width's space (its grid follows it); default 1.
        measure: replaces timing (``measure(model, a, b) -> ms``), for synthetic tables.
        fractions: grid fractions of each width.
    """

    def __init__(self, analysis: Analysis, step_of: Callable[[Space], int] | None = None,
                 measure: Measure | None = None, fractions: Sequence[float] = FRACTIONS) -> None:
        start = time.perf_counter()
        self.a = analysis
        self.measure = measure
        param = next((p for p in analysis.gm.parameters() if p.is_floating_point()), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32
        self.entries: list[Entry] = []
        for node in analysis.gm.graph.nodes:
            rule = analysis.node_rules.get(node.name)
            if rule is None or type(rule).macs is OpRule.macs:
                continue
            rec = _Recording(analysis.param_sizes)
            macs = rule.macs(node, rec)
            model = op_model(node, rule)
            if model is not None:
                model.widths(rec)
            deps = {analysis.index[sp] for sp in rec.seen if sp in analysis.index}
            if macs or model is not None:
                self.entries.append(Entry(node.name, rule, model, int(macs), deps))
        self._nodes = {n.name: n for n in analysis.gm.graph.nodes}
        layer_nodes = {e.node for e in self.entries}
        for node in analysis.gm.graph.nodes:
            if (node.op in ("call_function", "call_method", "call_module") and node.name not in layer_nodes
                    and isinstance(spec_of(node), TensorSpec)):
                rec = _Recording(analysis.param_sizes)
                elements = math.prod(rec.shape(node))
                deps = {analysis.index[sp] for sp in rec.seen if sp in analysis.index}
                self.entries.append(Entry(node.name, None, None, 0, deps, elements=int(elements)))
        self._fill([e for e in self.entries if e.model is not None], step_of or (lambda s: 1), fractions)
        timed = [e for e in self.entries if e.model is not None]
        timed_macs = sum(e.macs for e in timed)
        self.ms_per_mac = sum(e.full_ms for e in timed) / timed_macs if timed_macs else 0.0
        for e in self.entries:
            if e.model is None and e.rule is not None:
                e.full_ms = self.ms_per_mac * e.macs
        self.by_space: dict[int, list[int]] = {}
        for i, e in enumerate(self.entries):
            for sp in e.deps:
                self.by_space.setdefault(sp, []).append(i)
        self.residual_ms = 0.0
        self.ms_per_element = 0.0
        self.rate = 0.0  # measured milliseconds of a weight-1 element (``weigh``); 0: not weighed
        self.scale = 1.0
        self.layers_ms = sum(e.full_ms for e in self.entries if e.rule is not None)
        self.elements = self._weighted_elements()
        self.build_s = time.perf_counter() - start
        log.info("latency table: %d layers (%d timed, %d distinct shapes), %.3f ms, %d volume nodes, built in %.1f s",
                 len(layer_nodes), len(timed), len({e.model.signature + str(e.model.full) for e in timed if e.model}),
                 self.layers_ms, len(self.entries) - len(layer_nodes), self.build_s)

    # -- measuring ----------------------------------------------------------------------------------------------------
    def _key(self, model: OpModel, a: int, b: int) -> str:
        return f"{cache.key_prefix(self.device, self.dtype)}|{model.signature}|a={a}|b={b}"

    def _times(self, points: list[tuple[OpModel, int, int]]) -> list[float]:
        if self.measure is not None:
            return [float(self.measure(m, a, b)) for m, a, b in points]
        probes = {self._key(m, a, b): (lambda m=m, a=a, b=b: m.call(a, b, self.device, self.dtype))
                  for m, a, b in points}
        got: dict[str, float] = {}
        keys = list(probes)
        for i in range(0, len(keys), 16):  # a chunk's tensors are alive together: bound the memory
            got.update(cache.measure_cached({k: probes[k] for k in keys[i:i + 16]}, self.device))
        return [got[self._key(m, a, b)] for m, a, b in points]

    def _fill(self, entries: list[Entry], step_of: Callable[[Space], int], fractions: Sequence[float]) -> None:
        for e in entries:
            m = e.model
            assert m is not None
            ga = grid_widths(m.full[0], step_of(m.spaces[0]) if m.spaces[0] else 1, fractions)
            gb = (np.zeros(1, np.int64) if m.one_d else
                  grid_widths(m.full[1], step_of(m.spaces[1]) if m.spaces[1] else 1, fractions))
            e.grid = (ga, gb)
        points = list(dict.fromkeys((e.model, int(a), int(b)) for e in entries if e.model
                                    for a in e.grid[0] for b in e.grid[1]))
        by_sig: dict[tuple[str, int, int], float] = {}
        unique = list({(m.signature, a, b): (m, a, b) for m, a, b in points}.values())
        for (m, a, b), ms in zip(unique, self._times(unique)):
            by_sig[(m.signature, a, b)] = ms
        for e in entries:
            m = e.model
            assert m is not None
            e.values = np.array([[by_sig[(m.signature, int(a), int(b))] for b in e.grid[1]] for a in e.grid[0]])
            e.full_ms = float(e.values[-1, -1])

    # -- predicting ---------------------------------------------------------------------------------------------------
    def entry_ms(self, i: int, s: SizeContext) -> float:
        e = self.entries[i]
        if e.rule is None:
            return (self.ms_per_element * e.weight * math.prod(s.shape(self._nodes[e.node]))
                    if self.ms_per_element else 0.0)
        if e.model is None:
            return e.factor * self.ms_per_mac * e.rule.macs(self._nodes[e.node], s)
        a, b = e.model.widths(s)
        return e.factor * _interp(e.grid, e.values, a, b)

    def layers_at(self, new_sizes: dict[Space, int]) -> float:
        """The table's layers' milliseconds at ``new_sizes`` (volume entries excluded)."""
        s = SizeContext(new_sizes, self.a.param_sizes)
        return sum(self.entry_ms(i, s) for i, e in enumerate(self.entries) if e.rule is not None)

    def elements_at(self, new_sizes: dict[Space, int]) -> float:
        """The volume entries' output elements at ``new_sizes``, each times its ``weight``."""
        s = SizeContext(new_sizes, self.a.param_sizes)
        return sum(e.weight * math.prod(s.shape(self._nodes[e.node])) for e in self.entries if e.rule is None)

    def _weighted_elements(self) -> float:
        return float(sum(e.weight * e.elements for e in self.entries if e.rule is None))

    def weigh(self, node_ms: Mapping[str, float], max_factor: float = 4.0) -> None:
        """Weigh the entries by their in-model milliseconds at full size (``volume.node_ms``), each taken above
        the cheapest volume node's time (the per-node overhead every node pays, which the constant holds).

        A volume entry's weight is its time per output element (``volume.element_rates``: nodes of one kind share
        the slope of their times over their sizes) relative to the median of those rates (1 without a time; with
        no usable times all stay 1), and ``rate`` becomes the measured milliseconds of a weight-1
        element, which ``calibrate`` then keeps. A layer's ``factor`` is its in-model time over its table time
        (within ``1 / max_factor`` and ``max_factor``): the table keeps the shape of each layer's curve from the
        timed op and takes its level from the model. Call before ``calibrate``."""
        volume = [e for e in self.entries if e.rule is None and e.elements]
        timed = [(e, node_ms[e.node]) for e in volume if e.node in node_ms]
        floor = min((ms for _, ms in timed), default=0.0)
        for e in self.entries:
            if e.rule is not None and e.node in node_ms and e.full_ms > 0:
                e.factor = min(max((node_ms[e.node] - floor) / e.full_ms, 1 / max_factor), max_factor)
        self.layers_ms = sum(e.factor * e.full_ms for e in self.entries if e.rule is not None)
        if not timed:
            return
        rates = element_rates([(e.node, node_kind(self.a.gm, self._nodes[e.node]), e.elements, ms)
                               for e, ms in timed], floor)
        typical = float(np.median([r for r in rates.values() if r > 0])) if any(rates.values()) else 0.0
        if typical <= 0:
            return
        for e in volume:
            e.weight = rates.get(e.node, typical) / typical
        self.elements, self.rate = self._weighted_elements(), typical
        heavy = max(volume, key=lambda e: e.weight * e.elements)
        log.info("latency table: %d volume nodes weighed in the model (%.3f ms above %.3f ms each); heaviest %s "
                 "(weight %.2f)", len(timed), sum(ms - floor for _, ms in timed), floor, heavy.node, heavy.weight)

    def predict(self, new_sizes: dict[Space, int]) -> float:
        """Predicted end-to-end milliseconds at ``new_sizes``: ``residual_ms + scale * (layers + ms_per_element *
        elements)``, i.e. the constant plus every entry (the sum the planner's greedy keeps)."""
        s = SizeContext(new_sizes, self.a.param_sizes)
        return float(self.residual_ms + self.scale * sum(self.entry_ms(i, s) for i in range(len(self.entries))))

    @property
    def base_ms(self) -> float:
        """Predicted milliseconds of the unpruned graph."""
        return self.residual_ms + self.scale * (self.layers_ms + self.ms_per_element * self.elements)

    @property
    def outside_ms(self) -> float:
        """Predicted milliseconds of the unpruned graph outside the table's layers (constant and volume terms)."""
        return self.base_ms - self.scale * self.layers_ms

    def calibrate(self, measured: float | Sequence[tuple[dict[Space, int], float]],
                  max_residual: float = 0.5) -> None:
        """Fit the prediction to end-to-end measurements: ``measured`` is the unpruned graph's milliseconds, or
        ``(new_sizes, ms)`` pairs whose first is the unpruned graph (``{}``).

        What the layers leave out, ``ms - layers``, is fitted as ``residual_ms + ms_per_element * elements`` (least
        squares, both terms non-negative; with one measurement, or sizes that leave the elements unchanged, the
        constant alone). A table weighed in the model (``weigh``) keeps its measured cost per element (at most
        what the layers leave of the unpruned measurement) and takes the constant from the unpruned measurement.
        The rest may be at most ``max_residual`` of the unpruned measurement: beyond that (a machine
        busier than while the table was timed), and where the layers alone exceed it, the layers are scaled
        (``scale``) instead."""
        points = [({}, float(measured))] if isinstance(measured, (int, float)) else list(measured)
        full_ms = points[0][1]
        layers = np.array([self.layers_at(sizes) for sizes, _ in points])
        elements = np.array([self.elements_at(sizes) for sizes, _ in points], np.float64)
        ms = np.array([m for _, m in points], np.float64)
        outside = full_ms - self.layers_ms
        self.scale = 1.0
        if self.layers_ms and (outside < 0 or outside > max_residual * full_ms):
            self.scale = (full_ms - min(max(0.0, outside), max_residual * full_ms)) / self.layers_ms
        rest = ms - self.scale * layers  # what the layers leave out, per measurement
        self.residual_ms, per_element = float(max(0.0, rest[0])), 0.0
        if self.rate:  # weighed in the model: the volume's cost is measured, the constant is what is left
            per_element = float(min(self.rate, self.residual_ms / elements[0])) if elements[0] else 0.0
            self.residual_ms = float(max(0.0, rest[0] - per_element * elements[0]))
        elif len(points) > 1 and np.ptp(elements) > 0:
            design = np.stack([np.ones_like(elements), elements], 1)
            r0, q = np.linalg.lstsq(design, rest, rcond=None)[0]
            if q <= 0:
                r0, q = max(0.0, float(rest.mean())), 0.0
            elif r0 < 0:
                r0, q = 0.0, max(0.0, float(rest @ elements / (elements @ elements)))
            self.residual_ms, per_element = float(r0), float(q)
        self.ms_per_element = per_element / self.scale
        log.info("latency table calibrated on %d measurement(s): %.3f ms constant + %.3g ms per element "
                 "(%.3f ms of the unpruned graph's %.3f), layers x%.3f", len(points), self.residual_ms, per_element,
                 self.outside_ms, full_ms, self.scale)

    # -- round_to "auto" ----------------------------------------------------------------------------------------------
    def step(self, spaces: Iterable[Space], limit: int) -> int:
        """The width step of the heaviest timed layer one of whose widths is a space of ``spaces`` (1 if none):
        where its latency curve steps. ``limit``: the largest step allowed (e.g. a quarter of the width)."""
        wanted = set(spaces)
        best: tuple[float, OpModel, int] | None = None
        for e in self.entries:
            if e.model is None:
                continue
            for axis, sp in enumerate(e.model.spaces):
                if sp in wanted and (best is None or e.full_ms > best[0]):
                    best = (e.full_ms, e.model, axis)
        if best is None:
            return 1
        _, m, axis = best
        full = m.full[axis]
        candidates = [s for s in STEP_CANDIDATES if s <= max(1, limit)]
        while len(candidates) > 1 and (full - candidates[-1]) // candidates[-1] * candidates[-1] < candidates[-1]:
            candidates.pop()  # too narrow to see a step of that size
        top = candidates[-1]
        base = (full - top) // top * top
        if top == 1:
            return 1
        widths = [base + k for k in STEP_OFFSETS if k <= top]
        points = [(m, w, m.full[1]) if axis == 0 else (m, m.full[0], w) for w in widths]
        found = _fit_step(widths, self._times(points), candidates)
        log.debug("round_to auto: %s %s axis %d: step %d", m.node, m.signature, axis, found)
        return found


__all__ = ["LatencyTable", "Entry", "grid_widths", "FRACTIONS"]
