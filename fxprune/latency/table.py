"""The per-layer latency lookup table of an analysed graph: predicted milliseconds at any shrunk sizes.

Every layer that counts MACs is one entry. A layer with an ``OpModel`` (convolution, linear, attention) is timed
at a coarse grid of kept widths (``FRACTIONS`` of each width, on multiples of its ``round_to`` step, the full width
always included) and interpolated bilinearly in between; the grid values come from the shared cache
(``cache.measure_cached``: timed once per distinct op signature and shape, interleaved, on the device and dtype of
the layer's weights at the recorded input shapes, batch size included). Other layers (matmuls,
``nn.MultiheadAttention``) cost the table's mean milliseconds per MAC times their MACs. ``residual_ms`` is what
the whole model takes beyond the table's layers (norms, activations, pooling); ``calibrate`` sets it from an
end-to-end measurement.

``step(spaces)`` finds where a width's latency curve has its steps (``round_to: "auto"``): the layer's op is timed
at widths ``M + k`` just above a multiple ``M`` of 64 and the candidate step whose staircase fits the times best
(least squares) is taken, the smallest among near-ties.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..analysis import Analysis
from ..ir.context import SizeContext
from ..ir.space import Space
from ..ops.registry import OpRule
from . import cache
from .ops import OpModel, op_model

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
    rule: OpRule
    model: OpModel | None
    macs: int
    deps: set[int]  # analysis space indices its widths (or MACs) depend on
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
        self._fill([e for e in self.entries if e.model is not None], step_of or (lambda s: 1), fractions)
        timed = [e for e in self.entries if e.model is not None]
        timed_macs = sum(e.macs for e in timed)
        self.ms_per_mac = sum(e.full_ms for e in timed) / timed_macs if timed_macs else 0.0
        for e in self.entries:
            if e.model is None:
                e.full_ms = self.ms_per_mac * e.macs
        self.by_space: dict[int, list[int]] = {}
        for i, e in enumerate(self.entries):
            for sp in e.deps:
                self.by_space.setdefault(sp, []).append(i)
        self.residual_ms = 0.0
        self.scale = 1.0
        self.layers_ms = sum(e.full_ms for e in self.entries)
        self.build_s = time.perf_counter() - start
        log.info("latency table: %d layers (%d timed, %d distinct shapes), %.3f ms, built in %.1f s",
                 len(self.entries), len(timed), len({e.model.signature + str(e.model.full) for e in timed
                                                     if e.model}), self.layers_ms, self.build_s)

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
        if e.model is None:
            return self.ms_per_mac * e.rule.macs(self._nodes[e.node], s)
        a, b = e.model.widths(s)
        return _interp(e.grid, e.values, a, b)

    def layers_at(self, new_sizes: dict[Space, int]) -> float:
        """The table's layers' milliseconds at ``new_sizes``."""
        s = SizeContext(new_sizes, self.a.param_sizes)
        return sum(self.entry_ms(i, s) for i in range(len(self.entries)))

    def predict(self, new_sizes: dict[Space, int]) -> float:
        """Predicted end-to-end milliseconds at ``new_sizes``: ``residual_ms + scale * layers``."""
        return self.residual_ms + self.scale * self.layers_at(new_sizes)

    @property
    def base_ms(self) -> float:
        """Predicted milliseconds of the unpruned graph."""
        return self.residual_ms + self.scale * self.layers_ms

    def calibrate(self, measured_ms: float, max_residual: float = 0.25) -> None:
        """Make the unpruned prediction equal an end-to-end measurement: what the table's layers leave out becomes
        the constant ``residual_ms``, up to ``max_residual`` of the measurement; beyond that (a machine busier than
        while the table was timed) the layers are scaled (``scale``)."""
        self.residual_ms = min(max(0.0, measured_ms - self.layers_ms), max_residual * measured_ms)
        self.scale = (measured_ms - self.residual_ms) / self.layers_ms if self.layers_ms else 1.0

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
