"""``output="module"`` on the issue's models: the result is the model's own class, equals graph mode replaying the
same plan on the example inputs, and equals the masked oracle re-traced at a second input size (ViTs: batch 3, as
the position embedding fixes the image size). Small inputs for the CNNs; the real vit_b_16 at 224."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import fxprune
from fxprune.testing import assert_module_matches, state_digest
from fxprune.work import count_work

CHANNELS = {"stages": [{"kind": "channels", "target": {"flops": 0.5}}]}
HEADS_THEN_CHANNELS = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}},
                                  {"kind": "channels", "target": {"flops": 0.5}}]}


def _vit_b_16() -> nn.Module:
    m = torchvision.models.vit_b_16()
    nn.init.normal_(m.heads.head.weight, std=0.05)  # torchvision zero-initializes the head
    return m


CASES = {  # name: (constructor, example input, second input, recipe)
    "resnet50": (torchvision.models.resnet50, (1, 3, 64, 64), (2, 3, 96, 96), CHANNELS),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, (1, 3, 64, 64), (1, 3, 96, 96), CHANNELS),
    "vit_b_16": (_vit_b_16, (1, 3, 224, 224), (3, 3, 224, 224), HEADS_THEN_CHANNELS),
    "deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=10),
                  (1, 3, 32, 32), (3, 3, 32, 32), HEADS_THEN_CHANNELS),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), (1, 3, 64, 64), (1, 3, 96, 96),
                      CHANNELS),
}


@pytest.mark.parametrize("name", list(CASES))
def test_module_mode_keeps_class_and_matches(name: str) -> None:
    ctor, shape, second, recipe = CASES[name]
    torch.manual_seed(0)
    model = ctor().eval()
    x = torch.randn(shape)
    before = state_digest(model)
    result = fxprune.compile(model, recipe, example_inputs=x, output="module")
    assert type(result) is type(model) and not isinstance(result, torch.fx.GraphModule)
    assert state_digest(model) == before
    assert_module_matches(model, result, x, torch.randn(second))
    assert count_work(result, x)["macs"] < 0.75 * count_work(model, x)["macs"]


def test_timm_attention_attributes_follow_heads() -> None:
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    result = fxprune.compile(model, HEADS_THEN_CHANNELS, example_inputs=torch.randn(1, 3, 32, 32), output="module")
    for block in result.blocks:
        attn = block.attn
        assert attn.num_heads < 3 and attn.attn_dim == attn.num_heads * attn.head_dim == attn.proj.in_features


def test_patches_on_deit_equal_graph_mode() -> None:
    from fxprune.stages.patches.module import TokenGather

    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    recipe = {"stages": [{"kind": "patches", "keep": 0.5}]}
    result = fxprune.compile(model, recipe, example_inputs=x, output="module")
    assert type(result) is type(model) and isinstance(result.pos_drop, TokenGather)
    assert_module_matches(model, result, x, torch.randn(3, 3, 64, 64))


def test_patches_refused_where_no_module_holds_the_gather() -> None:
    from fxprune.errors import ModuleModeError

    model = timm.create_model("convnext_atto", num_classes=10, conv_mlp=False).eval()  # channels-last MLPs
    with pytest.raises(ModuleModeError, match="patches: module mode gathers the tokens of ViTs"):
        fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 0.5}]}, example_inputs=torch.randn(1, 3, 64, 64),
                        output="module")


def test_hf_vit_module_mode_updates_config() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=3)
    model = ViTForImageClassification(config).eval()
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}},
                         {"kind": "channels", "target": {"sparsity": 0.25}}]}
    result = fxprune.compile(model, recipe, example_inputs=x, output="module")
    assert type(result) is ViTForImageClassification
    assert (result.config.num_attention_heads, result.config.intermediate_size) == (2, 96)
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (4, 128)
    assert_module_matches(model, result, x, {"pixel_values": torch.randn(3, 3, 32, 32)})


def test_yolov8n_module_mode_runs_at_another_size() -> None:
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.rand(1, 3, 64, 64)
    result = fxprune.compile(model, CHANNELS, example_inputs=x, output="module")
    assert type(result) is DetectionModel and result.stride.tolist() == model.stride.tolist()
    assert_module_matches(model, result, x, torch.rand(1, 3, 96, 96))
    for m in result.modules():  # every C2f chunk(2) still cuts even halves
        if type(m).__name__ == "C2f":
            assert m.cv1.conv.out_channels == 2 * m.m[0].cv1.conv.in_channels
