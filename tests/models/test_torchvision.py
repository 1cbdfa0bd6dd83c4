"""Every torchvision classifier without attention compiles at sparsity 0.5 and at flops 0.5: output shape
unchanged, MACs reduced, masked == shrunk. Inputs are reduced to the smallest size each architecture takes."""
from __future__ import annotations

import functools

import pytest
import torch
import torchvision

from fxprune.testing import channel_recipe, prune_and_check
from fxprune.work import count_model, count_work

ATTENTION = ("vit_", "swin_", "maxvit_")
CNNS = [n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(ATTENTION)]
INPUT_SIZE = {"alexnet": 64, "inception_v3": 80, "googlenet": 48}


@functools.lru_cache(maxsize=1)
def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = INPUT_SIZE.get(name, 32)
    x = torch.randn(2, 3, size, size)
    return model, x, count_work(model, x)


def test_catalog_is_complete() -> None:
    assert len(CNNS) >= 60 and "resnet50" in CNNS and "shufflenet_v2_x1_0" in CNNS and "regnet_y_128gf" in CNNS


@pytest.mark.parametrize("target", ["sparsity", "flops"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in CNNS])
def test_torchvision_cnn(name: str, target: str) -> None:
    model, x, before = _model(name)
    pruned = prune_and_check(model, channel_recipe(0.5, target), x, atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    after = count_model(pruned)
    ratio = after["macs"] / before["macs"]
    assert ratio < 0.9, f"{name}: MACs only went to {ratio:.3f}x"
    if target == "flops":
        assert 0.5 - 1e-9 <= 1 - ratio <= 0.51, f"{name}: flops target 0.5 met as {1 - ratio:.3f}"
