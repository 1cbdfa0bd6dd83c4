"""timm models (random weights) compile at flops 0.3 with masked == shrunk: 29 of the 34 models in
``bench/timm_coverage.py`` plus resnet50 (deit_small/base, swinv2, beit and eva02 are slower at 224 and run in the
bench only). Transformers prune heads and MLP
hidden dims; the LayerNorm-normalized embedding stays. ``test_timm_straggler`` runs the four models issue 15 found
failing (weight-standardized convs, gMLP's gating unit, Hiera's optional mask), reduced where timm allows."""
from __future__ import annotations

import pytest
import torch

from fxprune.testing import channel_recipe, prune_and_check

timm = pytest.importorskip("timm")

TOKEN_MODELS = ("deit_tiny_patch16_224", "vit_small_patch16_224", "mixer_b16_224", "resmlp_12_224")
# fixed input size (224); several only trace with timm's own no-trace registries (used after a plain trace fails)
REGISTRY_MODELS = ("maxvit_tiny_tf_224", "twins_svt_small", "levit_128", "efficientformer_l1",
                   "swin_tiny_patch4_window7_224", "pvt_v2_b0", "coat_lite_tiny")
ANY_SIZE = ("edgenext_x_small", "mobilevit_xs", "fastvit_t8", "focalnet_tiny_srf")
MODELS = ["resnet50", "efficientnet_b0", "mobilenetv3_large_100", "regnety_016", "cspdarknet53", "dla34",
          "ghostnet_100", "repvgg_a2", "rexnet_100", "vovnet39a", "darknet53", "convnext_tiny", "hrnet_w18_small",
          "res2net50_26w_4s", "poolformer_s12", *ANY_SIZE, *TOKEN_MODELS, *REGISTRY_MODELS]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(f"timm-{n}")) for n in MODELS])
def test_timm_model(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = 64 if name not in TOKEN_MODELS + REGISTRY_MODELS else 224
    x = torch.randn(1, 3, size, size)
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), x, atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


# name -> (input size, create_model kwargs that shrink it: documented timm model arguments)
STRAGGLERS = {
    "nf_resnet26": (64, {}),  # ScaledStdConv2d everywhere: input channels pinned (fxprune.nn.PinnedStdConv2d)
    "dm_nfnet_f3": (64, {"depths": (1, 1, 1, 1)}),  # F3's blocks (grouped std convs, SE, final conv) at depth 1
    "gmlp_ti16_224": (64, {"img_size": 64}),  # SpatialGatingUnit (16 tokens)
    "hiera_small_224": (64, {"img_size": (64, 64), "stages": (1, 1, 2, 1)}),  # forward(x, mask=None)
}
FXPRUNE_MODULES = {"nf_resnet26": "PinnedStdConv2d", "dm_nfnet_f3": "PinnedStdConv2d",
                   "gmlp_ti16_224": "PrunedSpatialGatingUnit"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(f"timm-{n}")) for n in STRAGGLERS])
def test_timm_straggler(name: str) -> None:
    size, kwargs = STRAGGLERS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), x, atol=1e-3, rtol=1e-3)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    if name in FXPRUNE_MODULES:
        assert any(type(m).__name__ == FXPRUNE_MODULES[name] for m in pruned.modules())
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


def test_counting_work_leaves_the_model_traceable() -> None:
    """timm LeViT caches attention biases during forward: tracing the user's model itself would leave fx proxies in
    that cache and break every later trace (regression: count_work traced the model in place)."""
    from fxprune.work import count_work

    model = timm.create_model("levit_128", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    base = count_work(model, x)
    assert count_work(model, x) == base
    assert not any(isinstance(v, torch.fx.Proxy) for m in model.modules()
                   for v in getattr(m, "attention_bias_cache", {}).values())
