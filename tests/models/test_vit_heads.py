"""Head pruning on real ViTs: torchvision's VisionTransformer (nn.MultiheadAttention) at reduced size and timm's
deit_tiny / vit_small at 32x32. Heads at 50% then channels at flops 0.5: masked == shrunk, output shape unchanged,
MACs reduced, num_heads of the rewritten attention == kept heads; 0 graph breaks under torch.compile(fullgraph),
torch.export; save/load round trip."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from vit_models import torchvision_vit

import fxprune
from fxprune.nn.attention import PrunedMultiheadAttention
from fxprune.testing import assert_compiles, prune_and_check
from fxprune.work import count_work

HEADS_THEN_CHANNELS = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}},
                                  {"kind": "channels", "target": {"flops": 0.5}}]}
HEADS = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}}]}
X = torch.randn(2, 3, 32, 32)


def timm_vit(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"depth": 3} if name.startswith("vit_small") else {}
    return timm.create_model(name, pretrained=False, img_size=32, num_classes=10, **kwargs).eval()


def _check_reduced(model: nn.Module, pruned: nn.Module) -> float:
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape
    ratio = count_work(pruned, X)["macs"] / count_work(model, X)["macs"]
    assert ratio <= 0.51
    return ratio


def test_torchvision_vit_heads_then_channels() -> None:
    model = torchvision_vit()
    pruned = prune_and_check(model, HEADS_THEN_CHANNELS, X)
    _check_reduced(model, pruned)
    plan = pruned.fxprune_plan
    for i in range(2):
        path = f"encoder.layers.encoder_layer_{i}.self_attention"
        attn = pruned.get_submodule(path)
        assert isinstance(attn, PrunedMultiheadAttention)
        assert attn.num_heads == len(plan.kept[f"@{path}:0:0"]) <= 2
        assert attn.out_proj.in_features == attn.num_heads * attn.v_dim
    assert isinstance(model.encoder.layers.encoder_layer_0.self_attention, nn.MultiheadAttention)  # untouched


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224"])
def test_timm_vit_heads_then_channels(name: str) -> None:
    model = timm_vit(name)
    pruned = prune_and_check(model, HEADS_THEN_CHANNELS, X)
    _check_reduced(model, pruned)
    head_dim = model.blocks[0].attn.head_dim
    splits = [n for n in pruned.graph.nodes if n.target == "reshape" and len(n.args) == 6]
    assert len(splits) == len(model.blocks)
    for block, node in zip(model.blocks, splits):
        kept = pruned.get_submodule(node.args[0].target).out_features // (3 * head_dim)
        assert node.args[4] == kept <= block.attn.num_heads // 2 + block.attn.num_heads % 2  # num_heads rewritten


def _heads_pruned(kind: str) -> tuple[nn.Module, nn.Module]:
    model = torchvision_vit() if kind == "torchvision" else timm_vit("deit_tiny_patch16_224")
    return model, fxprune.compile(model, HEADS, example_inputs=X)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_heads_pruned_vit_compiles_fullgraph_without_breaks(kind: str) -> None:
    _, pruned = _heads_pruned(kind)
    assert_compiles(pruned, X)
    exported = torch.export.export(pruned, (X,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(X), pruned(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_heads_plan_save_load_round_trip(kind: str, tmp_path) -> None:
    model, pruned = _heads_pruned(kind)
    path = fxprune.save(pruned, tmp_path / "vit.fxp", example_inputs=X)
    again = fxprune.load(path, torchvision_vit if kind == "torchvision" else lambda: timm_vit("deit_tiny_patch16_224"))
    with torch.no_grad():
        torch.testing.assert_close(again(X), pruned(X), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("name,kwargs,size", [
    ("beit_base_patch16_224", {"depth": 2, "img_size": 32}, 32),  # F.linear qkv with a concatenated bias
    ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "window_size": 2, "img_size": 64}, 64),
])
def test_relative_position_bias_tables_follow_the_heads(name: str, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    pruned = prune_and_check(model, HEADS, x)
    tables = [(n, p) for n, p in pruned.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables
    for n, table in tables:
        heads = model.get_parameter(n).shape[1]
        assert table.shape[1] == heads - heads // 2  # the table's head columns follow the kept heads


def test_heads_then_head_dim_on_deit_round_trips(tmp_path) -> None:
    model = timm_vit("deit_tiny_patch16_224")
    recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}},
                         {"kind": "head_dim", "target": {"sparsity": 0.5}, "round_to": 8}]}
    pruned = fxprune.compile(model, recipe, example_inputs=X)
    assert pruned.get_submodule("blocks.0.attn.qkv").out_features == 3 * 2 * 32  # 2 of 3 heads, 32 of 64 dims
    path = fxprune.save(pruned, tmp_path / "deit.fxp", example_inputs=X)
    again = fxprune.load(path, lambda: timm_vit("deit_tiny_patch16_224"))
    with torch.no_grad():
        torch.testing.assert_close(again(X), pruned(X), atol=1e-5, rtol=1e-5)
