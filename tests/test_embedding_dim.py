"""Embedding-dim pruning (``layer_norm: renormalize`` on a channel stage; issue #3).

What is proven:
- ``masked_layer_norm`` (the oracle's reference semantics) equals ``F.layer_norm`` / ``F.rms_norm`` applied to the
  kept slice alone, by hand, for 1-D and 2-D normalized shapes.
- On small nets with ``nn.LayerNorm`` (affine and not), ``nn.RMSNorm``, ``F.layer_norm``, ``F.rms_norm`` and a 2-D
  normalized shape, the renormalize mode prunes the normalized channels and the shrunk model equals the original
  with removed channels zero-masked and every affected norm renormalized over its kept channels; the default mode
  still freezes them.
- On a reduced torchvision VisionTransformer and timm deit_tiny at 32x32 the residual stream (embedding dim) is
  halved: conv patch embedding, class token, position embedding, every LayerNorm, attention in/out features, MLP
  in/out and the head's in features; output shape unchanged, MACs reduced, masked == shrunk, save/load round trip,
  ``torch.compile(fullgraph=True)`` with 0 graph breaks.
- Recipe field and plan options validate and round-trip JSON; plans and recipes without them keep their exact form.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from vit_models import torchvision_vit

import fxprune
from fxprune.errors import BudgetError, RecipeError
from fxprune.plan import Plan
from fxprune.recipe import Recipe
from fxprune.testing import analyze_model, assert_compiles, frozen_of, masked_layer_norm, prune_and_check
from fxprune.work import count_work

RENORM = {"stages": [{"kind": "channels", "target": {"sparsity": 0.5}, "layer_norm": "renormalize"}]}
FREEZE = {"stages": [{"kind": "channels", "target": {"sparsity": 0.5}}]}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# -- the reference semantics, by hand ------------------------------------------------------------------------------
@pytest.mark.parametrize("rms", [False, True])
def test_masked_layer_norm_equals_norm_of_the_kept_slice(rms: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 10, generator=g) * 3 + 1, torch.randn(10, generator=g), torch.randn(10, generator=g)
    keep = torch.zeros(10, dtype=torch.bool)
    kept = torch.tensor([0, 2, 3, 7, 9])
    keep[kept] = True
    got = masked_layer_norm(x, keep, w, None if rms else b, 1e-5, rms)
    xs = x[..., kept]
    want = F.rms_norm(xs, (5,), w[kept], 1e-5) if rms else F.layer_norm(xs, (5,), w[kept], b[kept], 1e-5)
    torch.testing.assert_close(got[..., kept], want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[..., ~keep] == 0)
    # nothing removed: exactly the ordinary norm
    full = torch.ones(10, dtype=torch.bool)
    plain = F.rms_norm(x, (10,), w, 1e-5) if rms else F.layer_norm(x, (10,), w, b, 1e-5)
    torch.testing.assert_close(masked_layer_norm(x, full, w, None if rms else b, 1e-5, rms), plain,
                               atol=1e-5, rtol=1e-5)


def test_masked_layer_norm_two_normalized_dims() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 6, generator=g), torch.randn(4, 6, generator=g)
    cols = torch.tensor([1, 2, 5])
    keep = torch.zeros(4, 6, dtype=torch.bool)
    keep[:, cols] = True
    got = masked_layer_norm(x, keep, w, None, 1e-5)
    want = F.layer_norm(x[..., cols], (4, 3), w[:, cols], None, 1e-5)
    torch.testing.assert_close(got[..., cols], want, atol=1e-5, rtol=1e-5)


# -- small nets ------------------------------------------------------------------------------------------------------
class NormNet(nn.Module):
    """Every LayerNorm flavour over one residual stream of 16 features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.ln = nn.LayerNorm(16)
        self.rms = nn.RMSNorm(16, eps=1e-6)
        self.w = nn.Parameter(torch.randn(16) + 1)
        self.b = nn.Parameter(torch.randn(16))
        self.plain = nn.LayerNorm(16, elementwise_affine=False)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h + self.ln(h)
        h = self.rms(h)
        h = F.layer_norm(h, (16,), self.w, self.b, 1e-5)
        h = F.rms_norm(h, [16], self.w)
        return self.fc2(self.plain(h))


class ChannelsLastNet(nn.Module):
    """A LayerNorm over the last two dims (width, channels) of an NHWC tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.ln = nn.LayerNorm([4, 8])
        self.conv2 = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(h)


def test_small_net_renormalize_prunes_every_norm_flavour() -> None:
    torch.manual_seed(0)
    model, x = NormNet().eval(), torch.randn(5, 6)
    pruned = prune_and_check(model, RENORM, x)
    assert pruned.fxprune_plan.options == {"layer_norm": "renormalize"}
    assert pruned.fc1.out_features == 8 and pruned.fc2.in_features == 8
    assert pruned.ln.normalized_shape == (8,) and pruned.ln.weight.shape == (8,) and pruned.ln.bias.shape == (8,)
    assert pruned.rms.normalized_shape == (8,) and pruned.rms.weight.shape == (8,)
    assert pruned.plain.normalized_shape == (8,) and pruned.w.shape == (8,) and pruned.b.shape == (8,)
    assert pruned(x).shape == (5, 4)


def test_small_net_default_still_freezes_the_normalized_dims() -> None:
    torch.manual_seed(0)
    model, x = NormNet().eval(), torch.randn(5, 6)
    assert frozen_of(analyze_model(model, x), "@fc1:0:0").all()
    with pytest.raises(BudgetError, match="no prunable channel group"):  # the stream is the only group
        fxprune.compile(model, FREEZE, example_inputs=x)
    pruned = prune_and_check(model, {"stages": [{"target": {"flops": 0.0}}]}, x)
    assert pruned.fxprune_plan.options == {} and "options" not in pruned.fxprune_plan.to_dict()


def test_two_normalized_dims_prune_the_channel_dim_only() -> None:
    torch.manual_seed(0)
    model, x = ChannelsLastNet().eval(), torch.randn(2, 3, 4, 4)
    pruned = prune_and_check(model, RENORM, x)
    assert pruned.conv1.out_channels == 4 and pruned.ln.normalized_shape == (4, 4)
    assert pruned.ln.weight.shape == (4, 4) and pruned(x).shape == (2, 5, 4, 4)


# -- recipe and plan -------------------------------------------------------------------------------------------------
def test_recipe_field_validates_and_round_trips() -> None:
    r = Recipe.load(RENORM)
    assert r.stages[0].layer_norm == "renormalize"
    assert Recipe.from_dict(json.loads(r.to_json())).to_dict() == r.to_dict()
    assert "layer_norm" not in Recipe.load(FREEZE).to_dict()["stages"][0]  # default: the exact old form
    with pytest.raises(RecipeError, match=r"stages\[0\]\.layer_norm"):
        Recipe.load({"stages": [{"kind": "channels", "layer_norm": "normalize"}]})


def test_plan_options_round_trip_and_old_plans_load() -> None:
    plan = Plan({"@fc:0:0": [0, 2]}, {"@fc:0:0": 4}, options={"layer_norm": "renormalize"})
    again = Plan.from_json(plan.to_json())
    assert again.options == {"layer_norm": "renormalize"} and again.kept == plan.kept
    old = {k: v for k, v in plan.to_dict().items() if k != "options"}
    assert Plan.from_dict(old).options == {}
    assert Plan().compose(plan).options == {"layer_norm": "renormalize"}


# -- real ViTs -------------------------------------------------------------------------------------------------------
def deit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()


@pytest.fixture(scope="module")
def tv_pruned() -> tuple[nn.Module, nn.Module]:
    model = torchvision_vit()
    return model, prune_and_check(model, RENORM, X)


@pytest.fixture(scope="module")
def deit_pruned() -> tuple[nn.Module, nn.Module]:
    model = deit_tiny()
    return model, prune_and_check(model, RENORM, X)


def _mac_ratio(model: nn.Module, pruned: nn.Module) -> float:
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape
    return count_work(pruned, X)["macs"] / count_work(model, X)["macs"]


def test_torchvision_vit_embedding_dim_halves(tv_pruned) -> None:
    model, pruned = tv_pruned
    assert pruned.conv_proj.out_channels == 32
    assert pruned.class_token.shape == (1, 1, 32) and pruned.encoder.pos_embedding.shape == (1, 17, 32)
    norms = [m for m in pruned.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(m.normalized_shape == (32,) and m.weight.shape == (32,) for m in norms)
    for i in range(2):
        layer = getattr(pruned.encoder.layers, f"encoder_layer_{i}")
        attn = layer.self_attention
        assert attn.in_proj_weight.shape[1] == 32 and attn.out_proj.weight.shape[0] == 32
        assert getattr(layer.mlp, "0").in_features == 32 and getattr(layer.mlp, "3").out_features == 32
    assert pruned.heads.head.in_features == 32
    assert _mac_ratio(model, pruned) < 0.5


def test_torchvision_vit_default_keeps_the_stream(tv_pruned) -> None:
    model, renormalized = tv_pruned
    frozen = fxprune.compile(model, FREEZE, example_inputs=X)
    assert frozen.conv_proj.out_channels == 64 and frozen.class_token.shape == (1, 1, 64)
    assert _mac_ratio(model, renormalized) < _mac_ratio(model, frozen)


def test_deit_tiny_embedding_dim_halves(deit_pruned) -> None:
    model, pruned = deit_pruned
    assert pruned.patch_embed.proj.out_channels == 96
    assert pruned.cls_token.shape == (1, 1, 96) and pruned.pos_embed.shape == (1, 5, 96)
    for i in range(12):
        block = getattr(pruned.blocks, str(i))
        assert block.attn.qkv.in_features == 96 and block.attn.proj.out_features == 96
        assert block.mlp.fc1.in_features == 96 and block.mlp.fc2.out_features == 96
        assert block.norm1.weight.shape == (96,) and block.norm2.bias.shape == (96,)
    assert pruned.norm.weight.shape == (96,) and pruned.head.in_features == 96
    assert _mac_ratio(model, pruned) < 0.5


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_embedding_pruned_vit_save_load_round_trip(kind: str, tv_pruned, deit_pruned, tmp_path) -> None:
    _, pruned = tv_pruned if kind == "torchvision" else deit_pruned
    path = fxprune.save(pruned, tmp_path / "vit.fxp", example_inputs=X)
    again = fxprune.load(path, torchvision_vit if kind == "torchvision" else deit_tiny)
    assert again.fxprune_plan.options == {"layer_norm": "renormalize"}
    with torch.no_grad():
        torch.testing.assert_close(again(X), pruned(X), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_embedding_pruned_vit_compiles_fullgraph_without_breaks(kind: str, tv_pruned, deit_pruned) -> None:
    _, pruned = tv_pruned if kind == "torchvision" else deit_pruned
    assert_compiles(pruned, X)
