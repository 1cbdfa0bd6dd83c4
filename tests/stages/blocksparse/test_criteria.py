"""Block criteria and the one-slope allocation, on toys computed by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.criteria.base import ScoreContext
from fxprune.errors import BudgetError
from fxprune.stages.blocksparse.allocate import LayerCurve, allocate, keep_mask
from fxprune.stages.blocksparse.criteria import get_block_criterion
from fxprune.stages.blocksparse.layers import select_layers


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _traced(model: nn.Module, x: torch.Tensor):
    gm = fxprune.trace(model)
    fxprune.record_shapes(gm, (x,))
    return gm


def _toy():
    model = OneLinear().eval()
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[1., -2., 0., 3.], [0.5, 1., -1., 2.], [2., 0., 1., -1.],
                                             [-3., 1., 2., 0.]]))
        model.lin.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return model


def test_lpvit_scores_and_distortions_by_hand() -> None:
    model = _toy()
    batches = [torch.tensor([[1., 0., 2., -1.], [0., 1., 1., 1.]]),
               torch.tensor([[2., 1., 0., 0.5], [-1., 0., 1., 2.]])]
    gm = _traced(model, batches[0])
    layers = select_layers(gm, (2, 2), ["lin"], [])
    (costs,) = get_block_criterion("lpvit").costs(gm, layers, ScoreContext(data=batches), 8)
    # by hand: L = mean(Y^2) over the B x N outputs, so dL/dW = 2 / (B N) * Y^T X for each batch
    w = model.lin.weight.detach().double().numpy()
    b = model.lin.bias.detach().double().numpy()
    grads = []
    for xb in batches:
        x = xb.double().numpy()
        y = x @ w.T + b
        grads.append(2.0 / y.size * y.T @ x)
    g = np.mean(grads, axis=0)
    fisher = np.mean([gb ** 2 for gb in grads], axis=0)
    want_score = np.zeros((2, 2))
    want_cost = np.zeros((2, 2))
    for r in range(2):
        for c in range(2):
            sl = (slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2))
            want_score[r, c] = np.abs(w[sl] * g[sl]).mean()
            want_cost[r, c] = ((w[sl] * g[sl]) ** 2).sum() + 0.5 * ((fisher[sl] + 1e-7) * w[sl] ** 2).sum()
    np.testing.assert_allclose(costs.score.numpy(), want_score, rtol=1e-6)
    np.testing.assert_allclose(costs.distortion.numpy(), want_cost, rtol=1e-6)
    # the user's weights were not touched and no .grad was left behind
    assert model.lin.weight.grad is None and gm.get_submodule("lin").weight.grad is None


def test_lpvit_falls_back_to_example_inputs() -> None:
    model = _toy()
    x = torch.tensor([[1., 0., 2., -1.]])
    gm = _traced(model, x)
    layers = select_layers(gm, (2, 2), ["lin"], [])
    a = get_block_criterion("lpvit").costs(gm, layers, ScoreContext(example_inputs=(x,)), 8)[0]
    b = get_block_criterion("lpvit").costs(gm, layers, ScoreContext(data=[x]), 8)[0]
    assert torch.equal(a.score, b.score) and torch.equal(a.distortion, b.distortion)


def test_l2_and_dimap_block_scores_by_hand() -> None:
    model = OneLinear()
    with torch.no_grad():  # blocks (2x2) of norms 1, 2 / 3, 4: each block holds one nonzero value
        model.lin.weight.zero_()
        model.lin.weight[0, 0], model.lin.weight[1, 3], model.lin.weight[2, 1], model.lin.weight[3, 2] = 1., -2., 3., 4.
    x = torch.randn(1, 4)
    gm = _traced(model, x)
    layers = select_layers(gm, (2, 2), ["lin"], [])
    (l2,) = get_block_criterion("l2").costs(gm, layers, ScoreContext(), 1)
    assert l2.score.tolist() == [[1., 4.], [9., 16.]]
    (dimap,) = get_block_criterion("dimap").costs(gm, layers, ScoreContext(), 1)
    # ||B||^2 / sum of ||B'||^2 over blocks at least as large
    want = [[1 / 30, 4 / 29], [9 / 25, 1.0]]
    np.testing.assert_allclose(dimap.score.numpy(), want, rtol=1e-6)


def test_slope_allocation_matches_hand_optimum() -> None:
    # layer A: 1 weight per block, costs 1, 2, 3, 4; layer B: 2 per block, costs 0.5, 5, 6 (per unit: .25, 2.5, 3)
    a = LayerCurve(np.arange(4), np.array([1., 2., 3., 4.]), 1.0, 4)
    b = LayerCurve(np.arange(3), np.array([0.5, 5., 6.]), 2.0, 3)
    ks, lam = allocate([a, b], 6.0)
    assert ks == [2, 2] and 2.5 - 1e-6 <= lam <= 3.0  # slopes 1, 2 of A and .25, 2.5 of B are below lambda
    assert allocate([a, b], 0.0)[0] == [0, 0]
    assert allocate([a, b], 10.0)[0] == [4, 3]
    with pytest.raises(BudgetError, match="exceeds"):
        allocate([a, b], 10.5)


@pytest.mark.parametrize("seed", range(5))
def test_slope_search_meets_budget_within_one_percent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(12):
        n = int(rng.integers(20, 200))
        score = torch.from_numpy(rng.random(n))
        cost = torch.from_numpy(rng.random(n) * rng.choice([1e-3, 1.0, 1e3]))
        curves.append(LayerCurve.from_scores(score, cost, float(rng.choice([1, 4, 9])) * 64, 0.9))
    total = sum(c.rate * len(c.order) for c in curves)
    for frac in (0.1, 0.3, 0.5, 0.7):
        ks, _ = allocate(curves, frac * total)
        saving = sum(c.rate * k for c, k in zip(curves, ks))
        assert abs(saving - frac * total) <= 0.01 * frac * total
        assert all(0 <= k <= c.k_max for c, k in zip(curves, ks))


def test_keep_masks_are_nested_in_score_order() -> None:
    score = torch.tensor([[0.3, 0.1], [0.4, 0.2]])
    curve = LayerCurve.from_scores(score, score, 1.0, 0.9)
    masks = [keep_mask(curve, k, (2, 2)) for k in range(4)]
    assert masks[1].tolist() == [[True, False], [True, True]]
    assert masks[2].tolist() == [[True, False], [True, False]]
    assert masks[3].tolist() == [[False, False], [True, False]]
    assert curve.k_max == 3  # floor(0.9 * 4)


def test_latency_table_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    from fxprune.stages.blocksparse import latency

    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(latency, "_MEMORY", {})
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 64)
    gm = _traced(model, x)
    layers = select_layers(gm, (32, 32), [], [])
    assert [layer.path for layer in layers] == ["0", "2"]  # the output layer "3" is the head
    ms = latency.layer_latencies(layers)
    assert all(t > 0 for t in ms)
    table = json.loads((tmp_path / "latency.json").read_text())
    assert len(table) == 2 and sorted(table.values()) == sorted(ms)
    assert all("|linear|3x" in key for key in table)
    monkeypatch.setattr(latency, "_MEMORY", {})  # a new process: the JSON table answers, nothing is re-timed
    (tmp_path / "latency.json").write_text(json.dumps({k: 1.0 + i for i, k in enumerate(sorted(table))}))
    assert sorted(latency.layer_latencies(layers)) == [1.0, 2.0]
    # efficiency: time per MAC over the MAC-weighted mean; equal MACs here, so 1 ms vs 2 ms -> 2/3 and 4/3
    factors = latency.efficiency_factors(layers, [1.0, 2.0])
    np.testing.assert_allclose(factors, [2 / 3, 4 / 3])


def test_latency_term_prunes_slower_layers_more() -> None:
    # two identical layers; the second is twice as slow per MAC: dividing its distortions by e shifts removals to it
    score = torch.arange(1.0, 11.0)
    plain = [LayerCurve.from_scores(score, score, 1.0, 0.9) for _ in range(2)]
    assert allocate(plain, 10.0)[0] == [5, 5]
    aware = [LayerCurve.from_scores(score, score / e, 1.0, 0.9) for e in (2 / 3, 4 / 3)]
    ks, _ = allocate(aware, 10.0)
    assert sum(ks) == 10 and ks[1] > ks[0]


def test_lpvit_uses_at_most_calibration_batches_and_ignores_labels() -> None:
    model = _toy()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    gm = _traced(model, batches[0])
    layers = select_layers(gm, (2, 2), ["lin"], [])
    crit = get_block_criterion("lpvit")
    first_two = crit.costs(gm, layers, ScoreContext(data=batches[:2]), 8)[0]
    capped = crit.costs(gm, layers, ScoreContext(data=batches), 2)[0]
    labeled = crit.costs(gm, layers, ScoreContext(data=[(b, torch.zeros(3, dtype=torch.long)) for b in batches]), 2)[0]
    everything = crit.costs(gm, layers, ScoreContext(data=batches), 8)[0]
    assert torch.equal(first_two.distortion, capped.distortion) and torch.equal(capped.score, labeled.score)
    assert not torch.allclose(everything.distortion, capped.distortion)
