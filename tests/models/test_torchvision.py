"""All 80 torchvision classifiers (68 CNNs, 5 ViTs, 6 Swins, MaxViT) compile at sparsity 0.5 and at flops 0.5:
output shape unchanged, MACs reduced, masked == shrunk. Inputs are reduced to the smallest size each architecture
takes: ViTs are built for that size (``image_size=``), Swins take one 7x7 (v1) or 8x8 (v2) window per stage, and
MaxViT needs 224 (its 7x7 partitions must tile the last stage's 7x7 map)."""
from __future__ import annotations

import functools

import pytest
import torch
import torchvision

from fxprune.testing import channel_recipe, prune_and_check
from fxprune.work import count_model, count_work

ATTENTION = ("vit_", "swin_", "maxvit_")
MODELS = torchvision.models.list_models(module=torchvision.models)
CNNS = [n for n in MODELS if not n.startswith(ATTENTION)]
INPUT_SIZE = {"alexnet": 64, "inception_v3": 80, "googlenet": 48, "vit_h_14": 28, "maxvit_t": 224,
              **{n: 28 for n in ("swin_t", "swin_s", "swin_b")}}


@functools.lru_cache(maxsize=1)
def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    torch.manual_seed(0)
    size = INPUT_SIZE.get(name, 32)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    return model, x, count_work(model, x)


def test_catalog_is_complete() -> None:
    assert len(CNNS) >= 60 and "resnet50" in CNNS and "shufflenet_v2_x1_0" in CNNS and "regnet_y_128gf" in CNNS
    assert len(MODELS) == 80 and {"vit_h_14", "swin_v2_b", "maxvit_t"} <= set(MODELS)


# The four models over 1 GB of weights share one xdist group, so two never run at once (peak memory).
GIANTS = ("vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32")


@pytest.mark.parametrize("target", ["sparsity", "flops"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group("giants" if n in GIANTS else n))
                                  for n in MODELS])
def test_torchvision_classifier(name: str, target: str) -> None:
    model, x, before = _model(name)
    pruned = prune_and_check(model, channel_recipe(0.5, target), x, atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    after = count_model(pruned)
    ratio = after["macs"] / before["macs"]
    assert ratio < 0.9, f"{name}: MACs only went to {ratio:.3f}x"
    if target == "flops":
        assert 0.5 - 1e-9 <= 1 - ratio <= 0.51, f"{name}: flops target 0.5 met as {1 - ratio:.3f}"
    _done(name)


_RUNS: dict[str, int] = {}


def _done(name: str) -> None:
    """Drop a giant from the cache once both of its targets ran (the worker goes on with other groups)."""
    _RUNS[name] = _RUNS.get(name, 0) + 1
    if name in GIANTS and _RUNS[name] == 2:
        _model.cache_clear()
