"""CPU latency of pruned vs dense models at 50% FLOPs (pytest-benchmark).

Run: ``pytest bench/bench_latency.py --benchmark-only -q`` (``-s`` prints the table). Each case times the dense and
the pruned model alternately in one process and records, in ``extra_info``, the MACs ratio, the latency ratio and
``efficiency = (dense latency / pruned latency) / (dense MACs / pruned MACs)`` (target >= 0.85).

vit_b_16 is measured with three recipes at 50% FLOPs: ``mlp`` (attention ignored: MLP hidden dims only),
``heads+mlp`` (a ``heads`` stage at 50% of the heads, then MLP hidden dims to reach 50% overall) and ``channels``
(one channel stage: heads, head dims and MLP hidden dims at the same rate).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fxprune
from fxprune.work import count_work

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms

CASES = [("resnet50", 224, "channels"), ("vit_b_16", 224, "mlp"), ("vit_b_16", 224, "heads+mlp"),
         ("vit_b_16", 224, "channels")]
CHANNELS = {"target": {"flops": 0.5}, "round_to": 8}
MLP_ONLY = {**CHANNELS, "ignore": ["*self_attention"]}
HEADS = {"kind": "heads", "target": {"sparsity": 0.5}}


def _macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    return count_work(model, x)["macs"]


def prune_half_flops(model: torch.nn.Module, x: torch.Tensor, recipe: str) -> torch.nn.Module:
    """``model`` at 50% of its MACs with one of the recipes above."""
    if recipe == "channels":
        return fxprune.compile(model, {"stages": [CHANNELS]}, example_inputs=x)
    if recipe == "mlp":
        return fxprune.compile(model, {"stages": [MLP_ONLY]}, example_inputs=x)
    heads_only = fxprune.compile(model, {"stages": [HEADS]}, example_inputs=x)
    rest = 1 - 0.5 * _macs(model, x) / _macs(heads_only, x)  # what the MLP stage must remove of what is left
    return fxprune.compile(model, {"stages": [HEADS, {**MLP_ONLY, "target": {"flops": rest}}]}, example_inputs=x)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name, size, recipe", CASES)
def test_latency_at_half_flops(benchmark, name: str, size: int, recipe: str, batch: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    pruned = prune_half_flops(model, x[:1], recipe)
    runs = 5 if batch == 1 else 3
    dense = median_ms(model, x, runs)
    fast = benchmark.pedantic(median_ms, args=(pruned, x, runs), rounds=1, iterations=1)
    mac_ratio = _macs(model, x[:1]) / _macs(pruned, x[:1])
    speedup = dense / fast
    benchmark.extra_info.update({"dense_ms": dense, "pruned_ms": fast, "speedup": speedup, "macs_ratio": mac_ratio,
                                 "efficiency": speedup / mac_ratio})
    print(f"\n{name} ({recipe}) b={batch}: MACs {mac_ratio:.2f}x fewer, latency {speedup:.2f}x faster, "
          f"efficiency {speedup / mac_ratio:.2f}")
    assert pruned(x).shape == model(x).shape
