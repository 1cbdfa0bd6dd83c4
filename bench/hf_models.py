"""Tiny Hugging Face transformers vision models from their default configs (reduced depth, width and input), for
the coverage bench and tests. Random weights; nothing is downloaded."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# name -> (model class name, config class name, config overrides, input side)
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
HF_MODELS: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "ViTForImageClassification": ("ViTForImageClassification", "ViTConfig",
                                  dict(_SMALL, image_size=32, patch_size=8, num_labels=5), 32),
    "SwinForImageClassification": ("SwinForImageClassification", "SwinConfig",
                                   dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                        window_size=4, num_labels=5), 32),
    "ConvNextForImageClassification": ("ConvNextForImageClassification", "ConvNextConfig",
                                       dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5), 32),
    "ResNetForImageClassification": ("ResNetForImageClassification", "ResNetConfig",
                                     dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5), 32),
    "Dinov2Model": ("Dinov2Model", "Dinov2Config", dict(_SMALL, image_size=32, patch_size=8), 32),
    "SegformerForSemanticSegmentation": ("SegformerForSemanticSegmentation", "SegformerConfig",
                                         dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                              hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                                              strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
                                              num_labels=3), 32),
    "DeiTForImageClassification": ("DeiTForImageClassification", "DeiTConfig",
                                   dict(_SMALL, image_size=32, patch_size=8, num_labels=5), 32),
    "BeitForImageClassification": ("BeitForImageClassification", "BeitConfig",
                                   dict(_SMALL, image_size=32, patch_size=8, num_labels=5), 32),
    "MobileViTForImageClassification": ("MobileViTForImageClassification", "MobileViTConfig",
                                        dict(image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16,
                                             24, 32, 64], num_labels=5), 64),
    "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig", dict(_SMALL, image_size=32, patch_size=8), 32),
    "SiglipVisionModel": ("SiglipVisionModel", "SiglipVisionConfig", dict(_SMALL, image_size=32, patch_size=8), 32),
    "ConvNextV2ForImageClassification": ("ConvNextV2ForImageClassification", "ConvNextV2Config",
                                         dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5), 32),
    "Swinv2ForImageClassification": ("Swinv2ForImageClassification", "Swinv2Config",
                                     dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                          window_size=4, num_labels=5), 32),
    "EfficientNetForImageClassification": ("EfficientNetForImageClassification", "EfficientNetConfig",
                                           dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.2,
                                                hidden_dim=320, num_labels=5), 32),
    "RegNetForImageClassification": ("RegNetForImageClassification", "RegNetConfig",
                                     dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
                                          num_labels=5), 32),
    "MobileNetV2ForImageClassification": ("MobileNetV2ForImageClassification", "MobileNetV2Config",
                                          dict(image_size=32, depth_multiplier=0.25, num_labels=5), 32),
    "PvtV2ForImageClassification": ("PvtV2ForImageClassification", "PvtV2Config",
                                    dict(image_size=32, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                         hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                                         strides=[4, 2], mlp_ratios=[2, 2], num_labels=5), 32),
    "DPTForDepthEstimation": ("DPTForDepthEstimation", "DPTConfig",
                              dict(_SMALL, image_size=32, patch_size=8, backbone_out_indices=[0, 1],
                                   neck_hidden_sizes=[16, 32], fusion_hidden_size=16,
                                   reassemble_factors=[4, 2]), 32),
    "YolosForObjectDetection": ("YolosForObjectDetection", "YolosConfig",
                                dict(_SMALL, image_size=[32, 32], patch_size=8, num_detection_tokens=4,
                                     num_labels=5), 32),
    "Data2VecVisionForImageClassification": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig",
                                             dict(_SMALL, image_size=32, patch_size=8, num_labels=5), 32),
    "ViTMSNForImageClassification": ("ViTMSNForImageClassification", "ViTMSNConfig",
                                     dict(_SMALL, image_size=32, patch_size=8, num_labels=5), 32),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                 dict(_SMALL, image_size=32, patch_size=8, num_register_tokens=2), 32),
    "PoolFormerForImageClassification": ("PoolFormerForImageClassification", "PoolFormerConfig",
                                         dict(depths=[1, 1], hidden_sizes=[16, 32], num_encoder_blocks=2,
                                              patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1],
                                              num_labels=5), 32),
    "MobileNetV1ForImageClassification": ("MobileNetV1ForImageClassification", "MobileNetV1Config",
                                          dict(image_size=32, depth_multiplier=0.25, num_labels=5), 32),
    "BitForImageClassification": ("BitForImageClassification", "BitConfig",
                                  dict(embedding_size=32, hidden_sizes=[128, 256], depths=[1, 1], num_labels=5), 32),
    "FocalNetForImageClassification": ("FocalNetForImageClassification", "FocalNetConfig",
                                       dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                            focal_levels=[2, 2], focal_windows=[3, 3], num_labels=5), 32),
    "LevitForImageClassification": ("LevitForImageClassification", "LevitConfig",
                                    dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
                                         depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=5), 64),
    "HieraForImageClassification": ("HieraForImageClassification", "HieraConfig",
                                    dict(image_size=[64, 64], embed_dim=16, depths=[1, 1, 1, 1],
                                         num_heads=[1, 1, 2, 2], num_labels=5), 64),
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model ``name`` (eval mode, random weights, eager attention) and its example inputs as a keyword dict."""
    import transformers

    model_cls, config_cls, overrides, side = HF_MODELS[name]
    config: Any = getattr(transformers, config_cls)(**overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model: torch.nn.Module = getattr(transformers, model_cls)(config).eval()
    channels = getattr(config, "num_channels", 3)
    return model, {"pixel_values": torch.randn(1, channels, side, side)}


def names() -> list[str]:
    return list(HF_MODELS)


def builders() -> dict[str, Callable[[], tuple[torch.nn.Module, dict[str, torch.Tensor]]]]:
    return {n: (lambda n=n: build(n)) for n in HF_MODELS}
