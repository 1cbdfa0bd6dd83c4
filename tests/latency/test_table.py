"""The per-layer latency lookup table: grid on round_to, synthetic timings interpolated exactly, reuse across
runs from the on-disk cache, the step finder of ``round_to: "auto"``, the volume entries (checked against the
physically shrunk graph's outputs) and the calibration that fits the rest of the model's time."""
from __future__ import annotations

import copy
import json

import numpy as np
import torch
from fixtures import ResCatNet

from fxprune.analysis import analyze
from fxprune.criteria import ScoreContext, get_criterion
from fxprune.latency import LatencyTable, grid_widths
from fxprune.latency.table import _fit_step
from fxprune.passes.shrink_channels import ShrinkChannels
from fxprune.planner import Budget, Planner
from fxprune.trace import record_shapes, trace

X = torch.randn(1, 3, 8, 8)


def analysed(model=None):
    model = (model or ResCatNet(width=16, fuse=16, classes=4)).eval()
    gm = trace(model, example_inputs=(X,))
    record_shapes(gm, (X,))
    return analyze(gm)


def synthetic(model, a: int, b: int) -> float:
    """A bilinear latency (what bilinear interpolation reproduces exactly)."""
    return 1e-3 * a * max(b, 1) + 0.01


def test_grid_follows_round_to_and_keeps_the_full_width() -> None:
    assert grid_widths(64, 8).tolist() == [8, 24, 48, 64]  # 0.1, 0.4, 0.7 of 64 on multiples of 8, and 64
    assert all(w % 8 == 0 for w in grid_widths(64, 8))
    assert grid_widths(30, 8).tolist()[-1] == 30  # the full width even when it is no multiple


def test_synthetic_table_interpolates_exactly() -> None:
    a = analysed()
    table = LatencyTable(a, measure=synthetic)
    timed = [e for e in table.entries if e.rule is not None]
    assert len(timed) == 6 and all(e.model is not None for e in timed)
    assert np.isclose(table.layers_ms, sum(synthetic(None, *e.model.full) for e in timed))
    # body.0's output channels (32) are body.3's input channels: both parameter axes shrink together
    spaces = [s for s in a.spaces if (s.owner, s.dim) in (("@body.0", 0), ("@body.3", 1))]
    layers = {e.node: e for e in timed}
    before = layers_sum = table.layers_at({})
    after = table.layers_at({s: 13 for s in spaces})
    # body.0 (32 x 16 -> 13 x 16) and body.3 reading it (16 x 32 -> 16 x 13)
    expected = 1e-3 * (32 * 16 - 13 * 16) + 1e-3 * (16 * 32 - 16 * 13)
    assert np.isclose(before - after, expected) and layers_sum > after
    assert "body_0" in layers and "body_3" in layers


def test_table_reuses_the_disk_cache_across_runs(tmp_path, monkeypatch) -> None:
    from fxprune.latency import cache

    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "MEMORY", {})
    a = analysed()
    first = LatencyTable(a, fractions=(0.5, 1.0))
    stored = json.loads((tmp_path / "latency.json").read_text())
    assert stored and all("|conv2d|" in k or "|linear|" in k for k in stored)
    layers = [e for e in first.entries if e.rule is not None]
    assert len(stored) < 4 * len(layers)  # one entry per distinct signature and width, not per layer
    # a new process: the file answers (the values prove it), nothing is timed
    monkeypatch.setattr(cache, "MEMORY", {})
    (tmp_path / "latency.json").write_text(json.dumps({k: 2.0 for k in stored}))
    second = LatencyTable(a, fractions=(0.5, 1.0))
    assert all(e.full_ms == 2.0 for e in second.entries if e.rule is not None)


def test_step_fit_finds_a_staircase() -> None:
    widths = [64 + k for k in (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)]
    stairs = [float(-(-w // 16) * 16) for w in widths]
    assert _fit_step(widths, stairs, (1, 2, 4, 8, 16, 32, 64)) == 16
    assert _fit_step(widths, [float(w) for w in widths], (1, 2, 4, 8, 16, 32, 64)) == 1


def _plans(a, table, fractions):
    planner = Planner(a, get_criterion("l2").score(a, ScoreContext(example_inputs=(X,))), Budget(), latency=table)
    return planner, [planner.solve("flops", f) for f in fractions]


class _OutputElements(torch.fx.Interpreter):
    """Runs a graph and sums the output elements of the named nodes."""

    def __init__(self, gm, names) -> None:
        super().__init__(gm)
        self.names, self.total, self.seen = set(names), 0, set()

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.total += out.numel()
            self.seen.add(n.name)
        return out


def test_volume_entries_count_the_output_elements_of_the_shrunk_graph() -> None:
    a = analysed()
    table = LatencyTable(a, measure=synthetic)
    volume = [e.node for e in table.entries if e.rule is None]
    assert volume and not set(volume) & {e.node for e in table.entries if e.rule is not None}
    planner, (removed,) = _plans(a, table, [0.4])
    shrunk = copy.deepcopy(a.gm)
    ShrinkChannels(planner.plan(removed), (X,), a)(shrunk)
    counter = _OutputElements(shrunk, volume)
    counter.run(X)
    assert counter.seen == set(volume)  # every volume node survives the shrink under its name
    assert table.elements_at(planner.new_sizes(removed)) == counter.total < table.elements


def test_calibration_separates_the_constant_from_the_per_element_cost() -> None:
    a = analysed()
    table = LatencyTable(a, measure=synthetic)
    planner, (probe, other) = _plans(a, table, [0.3, 0.6])
    constant, per_element = 0.5, 2e-5

    def truth(sizes) -> float:
        return constant + table.layers_at(sizes) + per_element * table.elements_at(sizes)

    table.calibrate([({}, truth({})), (planner.new_sizes(probe), truth(planner.new_sizes(probe)))])
    assert table.scale == 1.0 and np.isclose(table.residual_ms, constant)
    assert np.isclose(table.ms_per_element, per_element)
    assert np.isclose(table.base_ms, truth({}))
    assert np.isclose(table.predict(planner.new_sizes(other)), truth(planner.new_sizes(other)))
    # the planner's greedy sums the same terms: its reduction is the prediction's
    assert np.isclose(planner.reduction(other, "latency"), 1 - truth(planner.new_sizes(other)) / truth({}))
    # one measurement: the rest is a constant
    table.calibrate(truth({}))
    assert table.ms_per_element == 0 and np.isclose(table.residual_ms, truth({}) - table.layers_ms)
    # a rest above half the measurement (a busy machine) scales the layers instead
    busy = 10 * table.layers_ms
    table.calibrate(busy)
    assert np.isclose(table.residual_ms, 0.5 * busy) and np.isclose(table.base_ms, busy) and table.scale > 1
