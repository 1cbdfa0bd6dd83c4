"""``attention: "gathered"``: the first block after the patch gather reads its packed qkv by index through the
``fxprune::gathered_attention`` custom op (Triton kernel on CUDA, gather + SDPA on CPU)."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from papr_reference import reference_token_indices, take
from torch import nn

import fxprune
from fxprune import PlanError, RecipeError


def _deit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10).eval()


def _recipe(attention: str = "gathered", z: float = 0.5) -> dict:
    return {"stages": [{"kind": "patches", "keep": z, "proposal": "tests:tiny", "attention": attention}]}


def test_gathered_first_attention_equals_reference_and_uses_the_op(tiny_proposal: nn.Module) -> None:
    model = _deit()
    torch.manual_seed(5)
    x = torch.randn(3, 3, 32, 32)
    pruned = fxprune.compile(model, _recipe(), example_inputs=x[:1])
    entry = pruned.fxprune_plan.rewrites[0]
    assert entry["attention"] == "gathered"
    targets = [getattr(n.target, "__name__", str(n.target)) for n in pruned.graph.nodes if n.op == "call_function"]
    assert targets.count("gathered_attention_heads_first") == 1
    assert targets.count("scaled_dot_product_attention") == 1  # the second block keeps plain SDPA
    idx = reference_token_indices(tiny_proposal, x, (4, 4), 0.5)
    with torch.no_grad():
        t = take(torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(x)], 1) + model.pos_embed, idx)
        want = model.head(model.norm(model.blocks(model.norm_pre(t)))[:, 0])
        torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=1e-5)


def test_compiles_without_graph_breaks_and_round_trips(tmp_path, tiny_proposal: nn.Module) -> None:
    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32)
    pruned = fxprune.compile(_deit(), _recipe(), example_inputs=x)
    explained = torch._dynamo.explain(pruned)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(pruned, backend="aot_eager", fullgraph=True)
    path = fxprune.save(pruned, tmp_path / "deit.fxp", example_inputs=x)
    again = fxprune.load(path, _deit)
    assert again.fxprune_plan.rewrites == pruned.fxprune_plan.rewrites
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), pruned(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(x), pruned(x), atol=0, rtol=0)


def test_gradients_flow_through_the_custom_op(tiny_proposal: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    fused = fxprune.compile(_deit(), _recipe(), example_inputs=x)
    plain = fxprune.compile(_deit(), _recipe("sdpa"), example_inputs=x)
    fused(x).square().sum().backward()
    plain(x).square().sum().backward()
    qkv = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(dict(fused.named_parameters())[qkv].grad, dict(plain.named_parameters())[qkv].grad,
                               atol=1e-5, rtol=1e-4)


def test_unsupported_models_and_bad_values(tiny_proposal: nn.Module) -> None:
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32).eval()
    with pytest.raises(PlanError, match="attention 'gathered'.*timm-style attention.*Use attention 'sdpa'"):
        fxprune.compile(vit, _recipe(), example_inputs=torch.randn(1, 3, 32, 32))
    cfg = torchvision.models.convnext.CNBlockConfig
    convnext = torchvision.models.convnext.ConvNeXt([cfg(8, 16, 1), cfg(16, None, 1)]).eval()
    with pytest.raises(PlanError, match="attention 'gathered' applies to ViTs"):
        fxprune.compile(convnext, _recipe(), example_inputs=torch.randn(1, 3, 32, 32))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.attention.*sdpa, gathered"):
        fxprune.Recipe.load(_recipe("flash"))


@pytest.mark.parametrize("attention", ["sdpa", "gathered"])
def test_tokens_dropped_after_a_later_block_and_the_model_traces_again(attention: str,
                                                                       tiny_proposal: nn.Module) -> None:
    """``where`` names the residual add that ends block 0: block 0 sees every token, block 1 only the kept ones
    (with ``gathered``, block 1 reads its packed qkv by index). The pruned model traces again: ``report`` counts it
    and a further channel stage prunes it."""
    model = _deit()
    torch.manual_seed(6)
    x = torch.randn(3, 3, 32, 32)
    recipe = {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "tests:tiny", "attention": attention,
                          "where": "add_2"}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x[:1])
    idx = reference_token_indices(tiny_proposal, x, (4, 4), 0.5)
    with torch.no_grad():
        t = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(x)], 1) + model.pos_embed
        t = take(model.blocks[0](model.norm_pre(t)), idx)
        want = model.head(model.norm(model.blocks[1](t))[:, 0])
        torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=1e-5)
    dense, full = fxprune.report(model, model, x[:1]), fxprune.report(model, pruned, x[:1])
    assert 0.5 < full.macs_ratio < 0.9 and dense.macs_ratio == 1
    again = fxprune.testing.prune_and_check(pruned, {"stages": [{"kind": "channels", "target": {"flops": 0.3}}]},
                                            x[:1])
    assert fxprune.report(model, again, x[:1]).macs_ratio < full.macs_ratio
