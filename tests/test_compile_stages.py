"""Every stage kind yields a compiler-friendly model: ``torch._dynamo.explain`` finds 0 graph breaks,
``torch.compile(fullgraph=True)`` matches eager, and ``torch.export.export`` matches eager — for channels, heads,
blocksparse and patches alone and for all four chained in one recipe (a tiny torchvision ViT, to stay fast)."""
from __future__ import annotations

import pytest
import torch
from fixtures import TinyProposal
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import fxprune
from fxprune.testing import assert_compiles

RECIPES = {
    "channels": [{"kind": "channels", "target": {"flops": 0.3}}],
    "heads": [{"kind": "heads", "target": {"sparsity": 0.5}}],
    "blocksparse": [{"kind": "blocksparse", "target": {"sparsity": 0.5}, "block": [16, 16]}],
    "patches": [{"kind": "patches", "keep": 0.5, "proposal": "compile-test:tiny"}],
}
RECIPES["all"] = [RECIPES["heads"][0], {"kind": "channels", "target": {"flops": 0.2}, "round_to": 16},
                  RECIPES["blocksparse"][0], RECIPES["patches"][0]]


@pytest.fixture(scope="module")
def vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    fxprune.stages.patches.register_proposal("compile-test:tiny", TinyProposal().eval())
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=5).eval()
    return model, torch.randn(2, 3, 32, 32)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", list(RECIPES))
def test_every_stage_kind_compiles_fullgraph_and_exports(vit, kind: str) -> None:
    model, x = vit
    pruned = fxprune.compile(model, {"stages": RECIPES[kind]}, example_inputs=x)
    report = fxprune.report(model, pruned, x)
    assert report.macs_ratio < 0.95, f"{kind} removed no work"
    assert_compiles(pruned, x)
    with torch.no_grad():
        want = pruned(x)
    exported = torch.export.export(pruned, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), want, atol=1e-5, rtol=1e-5)
    assert want.shape == model(x).shape


def test_all_stages_with_inductor_backend(vit) -> None:
    model, x = vit
    eager = fxprune.compile(model, {"stages": RECIPES["all"]}, example_inputs=x)
    compiled = fxprune.compile(model, {"stages": RECIPES["all"]}, example_inputs=x, backend="inductor")
    assert compiled.fxprune_plan.to_json() == eager.fxprune_plan.to_json()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)
