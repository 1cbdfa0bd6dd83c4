"""Hybrid ViTs (a CNN stem instead of a patch convolution, timm ``vit_*_r26_*``): the token grid is the stem's last
map, and PaPr drops tokens after the position embedding as in a plain ViT."""
from __future__ import annotations

import timm
import torch
from papr_reference import reference_token_indices, take
from torch import nn

import fxprune


def _hybrid() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=128, depth=2, num_classes=5).eval()


def test_hybrid_vit_equals_reference_and_keep_one_is_exact(tiny_proposal: nn.Module) -> None:
    model = _hybrid()
    torch.manual_seed(4)
    x = torch.randn(3, 3, 128, 128)
    recipe = {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "tests:tiny"}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x[:1])
    entry = pruned.fxprune_plan.rewrites[0]
    assert entry["grid"] == [4, 4] and entry["prefix"] == 1 and entry["tokens"] == 8
    idx = reference_token_indices(tiny_proposal, x, (4, 4), 0.5)
    with torch.no_grad():
        t = take(model._pos_embed(model.patch_embed(x)), idx)
        want = model.forward_head(model.norm(model.blocks(model.norm_pre(t))))
        torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=1e-5)
    recipe["stages"][0]["keep"] = 1.0
    whole = fxprune.compile(model, recipe, example_inputs=x[:1])
    with torch.no_grad():
        assert torch.equal(whole(x), model(x))
    assert fxprune.report(model, pruned, x[:1]).macs_ratio < 1
