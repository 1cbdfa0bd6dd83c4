"""The table weighed by times inside the model: ``volume.node_ms`` times single nodes in a real forward pass, and
``LatencyTable.weigh`` turns those times into per-node costs of an element (volume entries) and in-model factors
(layers), which the prediction for a physically shrunk graph then follows node by node."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.fx as fx
from test_table import X, _OutputElements, _plans, analysed, synthetic
from torch import nn

from fxprune.latency import LatencyTable
from fxprune.latency.volume import element_rates, node_kind, node_ms
from fxprune.passes.shrink_channels import ShrinkChannels


def _slow(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.005)
    return x + 1


fx.wrap("_slow")


class _WithSlowNode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(_slow(self.conv(x)))


def test_node_ms_times_each_named_node_inside_a_forward_pass() -> None:
    gm = fx.symbolic_trace(_WithSlowNode())
    names = [n.name for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"]
    ms = node_ms(gm, (X,), names, repeats=3)
    assert set(ms) == set(names) and all(v > 0 for v in ms.values())
    assert ms["_slow"] >= 5.0 and all(v < 5.0 for k, v in ms.items() if k != "_slow")


class _PerNodeCost(_OutputElements):
    """Sums ``rate[node] x output elements`` over the named nodes of a graph as it runs (the shrunk graph's truth)."""

    def __init__(self, gm, rates) -> None:
        super().__init__(gm, rates)
        self.rates, self.cost = rates, 0.0

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.rates:
            self.cost += self.rates[n.name] * out.numel()
        return out


def test_weighed_table_predicts_per_node_costs_of_the_shrunk_graph() -> None:
    """In-model times: every node pays ``overhead``; a third of the volume nodes cost 4x per element; the layers
    run 1.5x their (synthetic) table times. The truth for a shrunk graph is summed node by node by running it."""
    a = analysed()
    table, flat = LatencyTable(a, measure=synthetic), LatencyTable(a, measure=synthetic)  # flat: never weighed
    volume = [e for e in table.entries if e.rule is None]
    layers = [e for e in table.entries if e.rule is not None]
    rates = {e.node: 2e-4 if i % 3 == 0 else 5e-5 for i, e in enumerate(volume)}
    rates[min(volume, key=lambda e: e.elements).node] = 0.0  # the smallest (like a view) costs only the overhead
    overhead, slower = 0.02, 1.5
    times = {e.node: overhead + rates[e.node] * e.elements for e in volume}
    table.weigh(times | {e.node: overhead + slower * e.full_ms for e in layers})
    assert {round(e.weight, 6) for e in volume} == {0.0, 1.0, 4.0} and np.isclose(table.rate, 5e-5)
    assert np.allclose([e.factor for e in layers], slower) and np.isclose(table.layers_ms, slower * flat.layers_ms)

    def truth(removed: np.ndarray) -> float:
        counter = _PerNodeCost(_shrunk(a, planner, removed), rates)
        counter.run(X)
        assert counter.seen == set(rates)
        return constant + slower * flat.layers_at(planner.new_sizes(removed)) + counter.cost

    constant = 0.3 + overhead * len(volume)
    dense = constant + slower * flat.layers_ms + sum(rates[e.node] * e.elements for e in volume)
    table.calibrate(dense)
    assert np.isclose(table.base_ms, dense) and np.isclose(table.residual_ms, constant)
    planner, (removed, other) = _plans(a, table, [0.4, 0.7])
    sizes = planner.new_sizes(removed)
    assert np.isclose(table.predict(sizes), truth(removed))
    # one cost per element for all nodes and the table's own layer times (unweighed) misjudge the same graph
    flat.calibrate([({}, dense), (sizes, truth(removed))])
    wanted = truth(other)
    assert abs(table.predict(planner.new_sizes(other)) - wanted) < 1e-9 < abs(
        flat.predict(planner.new_sizes(other)) - wanted)


def test_layer_factors_stay_within_bounds() -> None:
    a = analysed()
    table = LatencyTable(a, measure=synthetic)
    first, second = [e for e in table.entries if e.rule is not None][:2]
    table.weigh({first.node: 100 * first.full_ms, second.node: 0.0})
    assert (first.factor, second.factor) == (4.0, 0.25)


def _shrunk(a, planner, removed) -> fx.GraphModule:
    out = copy.deepcopy(a.gm)
    ShrinkChannels(planner.plan(removed), (X,), a)(out)
    return out


def test_weighing_real_times_of_a_real_graph() -> None:
    a = analysed()
    table = LatencyTable(a, measure=synthetic)
    volume = [e.node for e in table.entries if e.rule is None]
    table.weigh(node_ms(a.gm, (X,), volume))
    assert table.rate > 0 and all(np.isfinite(e.weight) and e.weight >= 0 for e in table.entries if e.rule is None)
    assert np.isclose(table.elements, sum(e.weight * e.elements for e in table.entries if e.rule is None))


def test_element_rates_share_a_kinds_slope_and_leave_its_cost_per_call_out() -> None:
    floor, per_call, slope = 0.01, 0.05, 1e-4
    bn = [(f"bn{i}", "BatchNorm2d", n, floor + per_call + slope * n) for i, n in enumerate((100, 200, 400, 800))]
    pair = [("a", "add", 100, floor + 0.03), ("b", "add", 300, floor + 0.09)]  # two sizes: no line
    falling = [(f"f{i}", "f", n, floor + 1.0 - 1e-3 * n) for i, n in enumerate((10, 20, 30))]
    rates = element_rates(bn + pair + falling, floor)
    assert all(np.isclose(rates[name], slope) for name, *_ in bn)
    assert np.isclose(rates["a"], 3e-4) and np.isclose(rates["b"], 3e-4)
    assert all(np.isclose(rates[name], (ms - floor) / n) for name, _, n, ms in falling)


class _Widening(nn.Module):
    """Three BatchNorms of three widths (a kind whose times fit a line), between prunable convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def test_a_kinds_cost_per_call_stays_in_the_constant() -> None:
    a = analysed(_Widening())
    table = LatencyTable(a, measure=synthetic)
    volume = [e for e in table.entries if e.rule is None]
    kinds = {e.node: node_kind(a.gm, table._nodes[e.node]) for e in volume}
    assert sorted(kinds.values()).count("BatchNorm2d") == 3
    floor, per_call, slope = 0.01, 0.05, 5e-5  # (the rest stays under half the time: no layer scaling)
    rates = {e.node: slope for e in volume}
    times = {e.node: floor + (per_call if kinds[e.node] == "BatchNorm2d" else 0.0) + slope * e.elements
             for e in volume}
    smallest = min(volume, key=lambda e: e.elements).node
    rates[smallest], times[smallest] = 0.0, floor  # a node that costs only the overhead (sets the floor)
    table.weigh(times)
    constant = 0.1 + floor * len(volume) + per_call * 3
    dense = constant + table.layers_ms + sum(rates[e.node] * e.elements for e in volume)
    table.calibrate(dense)
    assert table.scale == 1.0 and np.isclose(table.residual_ms, constant)
    planner, (removed,) = _plans(a, table, [0.5])
    counter = _PerNodeCost(_shrunk(a, planner, removed), rates)
    counter.run(X)
    sizes = planner.new_sizes(removed)
    assert np.isclose(table.predict(sizes), constant + table.layers_at(sizes) + counter.cost)
