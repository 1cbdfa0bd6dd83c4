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


_SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
TEXT_MODELS = {  # name: (config class, config fields, attention)
    "BertForSequenceClassification": ("BertConfig", _SIZES, "sdpa"),
    "BertForSequenceClassification-eager": ("BertConfig", _SIZES, "eager"),
    "RobertaForSequenceClassification": ("RobertaConfig", _SIZES, "eager"),
    "DistilBertForSequenceClassification": ("DistilBertConfig", {"dim": 64, "n_layers": 2, "n_heads": 4,
                                                                 "hidden_dim": 128}, "eager"),
    "GPT2ForSequenceClassification": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "pad_token_id": 0,
                                                     "use_cache": False}, "eager"),
    "LlamaForCausalLM": ("LlamaConfig", {**_SIZES, "num_key_value_heads": 2, "use_cache": False}, "eager"),
}


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_hf_text_model_with_a_padded_attention_mask_prunes(name: str) -> None:
    """Text models from small configs with ``input_ids`` and a padded ``attention_mask``. What their code needs of
    the capture: ``transformers.masking_utils`` builds masks with ``q_idx.new_ones((), ...)`` (a 0-d shape the shape
    spelling must keep) and ``torch.finfo(dtype).min`` of a traced dtype (answered from the example run); BERT's
    embeddings slice a buffer by a traced length and expand it to traced sizes (buffers are proxies); DistilBERT
    calls ``nn.ReLU()(x)``, a module built inside forward (traced through); GPT-2's layers are ``Conv1D``
    (``fxprune.ops.hf_conv1d``). Masked == shrunk, fewer parameters, the
    same logits shape, and the whole model traced (no automatic leaf)."""
    import transformers

    from fxprune.capture.leaves import capture_lines

    config_cls, fields, attention = TEXT_MODELS[name]
    config = getattr(transformers, config_cls)(vocab_size=100, **fields)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = getattr(transformers, name.split("-")[0])(config).eval()
    ids = torch.randint(1, 100, (2, 16))
    inputs = {"input_ids": ids, "attention_mask": (torch.arange(16) < torch.tensor([[16], [11]])).long()}
    pruned = prune_and_check(model, channel_recipe(0.3, "flops"), inputs)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert pruned(*inputs.values()).logits.shape == model(**inputs).logits.shape
    leaves = [line for line in capture_lines(pruned) if line.startswith("auto leaf")]
    assert not leaves, leaves
