"""Compile time (trace + analysis + scoring + planning + rewrite) of fxprune.compile on 224x224 models.

Run: ``pytest bench/bench_compile_time.py --benchmark-only -q``. Targets on a 2-core machine: resnet50 < 2 s,
vit_b_16 < 3 s.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16"])
def test_compile_time(benchmark, name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    recipe = {"stages": [{"target": {"flops": 0.5}}]}
    pruned = benchmark.pedantic(fxprune.compile, args=(model, recipe), kwargs={"example_inputs": x},
                                rounds=3, iterations=1, warmup_rounds=1)
    assert pruned(x).shape == model(x).shape
