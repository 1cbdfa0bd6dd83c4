"""Hugging Face transformers vision models from their default configs (2 layers, width 16-64, 32-64 px inputs,
random weights, keyword inputs ``{"pixel_values": x}``), whole model at ``flops: 0.3``: masked == shrunk, the
input model unchanged (``prune_and_check``), parameters reduced, the same ``ModelOutput`` type returned."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from hf_models import build

from fxprune.capture import GuardError
from fxprune.testing import channel_recipe, prune_and_check

MODELS = ["ViTForImageClassification", "SwinForImageClassification", "ConvNextForImageClassification",
          "ResNetForImageClassification", "Dinov2Model", "SegformerForSemanticSegmentation",
          "DeiTForImageClassification", "BeitForImageClassification", "CLIPVisionModel", "Swinv2ForImageClassification",
          "YolosForObjectDetection", "SiglipVisionModel", "PvtV2ForImageClassification", "DPTForDepthEstimation",
          "RegNetForImageClassification", "MobileNetV2ForImageClassification", "EfficientNetForImageClassification",
          "MobileViTForImageClassification", "Dinov2WithRegistersModel", "PoolFormerForImageClassification",
          "FocalNetForImageClassification", "LevitForImageClassification", "HieraForImageClassification"]


@pytest.mark.parametrize("name", MODELS)
def test_hf_model_prunes(name: str) -> None:
    model, inputs = build(name)
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), inputs)
    with torch.no_grad():
        want, got = model(**inputs), pruned(*inputs.values())
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_hf_vit_guard_on_other_resolution() -> None:
    model, inputs = build("ViTForImageClassification")
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), inputs)
    with pytest.raises(GuardError, match=r"pixel_values.*shape\[2\] = 64.*modeling_vit.py"):
        pruned(torch.randn(1, 3, 64, 64))


def test_hf_vit_pruned_exports_and_compiles_fullgraph() -> None:
    from fxprune.testing import assert_compiles

    model, inputs = build("ViTForImageClassification")
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), inputs)
    x = inputs["pixel_values"]
    exported = torch.export.export(pruned, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, pruned(x).logits)
    assert_compiles(pruned, x)


def test_hf_bert_mask_builder_keeps_its_0d_shape() -> None:
    """BERT with ``input_ids`` and an all-ones ``attention_mask``: ``transformers.masking_utils`` builds the mask with
    ``q_idx.new_ones((), ...)``, a 0-d shape that the capture's shape spelling used to drop (the traced graph then
    failed on the example inputs). The model prunes, masked == shrunk. Not covered yet: eager attention or a padded
    mask, whose path calls ``torch.finfo`` on a traced dtype and leaves the whole ``BertModel`` unpruned (an
    automatic leaf)."""
    import transformers

    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=100)  # default (sdpa) attention
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 100, (2, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), inputs)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    ones = [n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "new_ones"]
    assert ones and all(n.args[1:2] == ((),) for n in ones), [n.format_node() for n in ones]
