"""Small ViTs shared by test modules in several folders (``tests/`` is on ``sys.path`` through its conftest)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn


def torchvision_vit() -> nn.Module:
    """A 2-layer torchvision ViT on 32x32 images (4x4 patches of 8, 4 heads, width 64), seeded, in eval mode."""
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                             mlp_dim=128, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-initializes the head: the output would be 0
    return m.eval()
