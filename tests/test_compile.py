"""Pruned models stay compiler-friendly: torch.compile(fullgraph=True) with 0 graph breaks, the backend= option
of fxprune.compile, and torch.export. Inputs are tiny and inductor runs once, to keep this file fast on CPU.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune.testing import assert_compiles

RECIPE = {"stages": [{"kind": "channels", "target": {"flops": 0.5}, "criterion": "l2"}]}
MODELS = [("resnet18", 32), ("mobilenet_v3_small", 32), ("shufflenet_v2_x0_5", 32)]


def _prune(name: str, size: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    pruned = fxprune.compile(model, RECIPE, example_inputs=x)
    assert fxprune.report(model, pruned, x).macs_ratio < 0.6  # really pruned
    return model, pruned, x


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("name,size", MODELS)
def test_fullgraph_compile_has_no_graph_breaks_and_matches_eager(name: str, size: int) -> None:
    _, pruned, x = _prune(name, size)
    assert_compiles(pruned, x)


@pytest.mark.parametrize("name,size", MODELS)
def test_torch_export_matches_eager(name: str, size: int) -> None:
    _, pruned, x = _prune(name, size)
    exported = torch.export.export(pruned, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), pruned(x), atol=1e-5, rtol=1e-5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(exported.module()) == count(pruned)  # the exported program carries the shrunk weights


def test_backend_inductor_returns_a_compiled_module_that_matches() -> None:
    model, pruned, x = _prune("resnet18", 32)
    compiled = fxprune.compile(model, RECIPE, example_inputs=x, backend="inductor")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.fxprune_plan.kept == pruned.fxprune_plan.kept
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), pruned(x), atol=1e-4, rtol=1e-4)
    # the model itself is untouched by compile(..., backend=...)
    assert model.conv1.out_channels == 64
