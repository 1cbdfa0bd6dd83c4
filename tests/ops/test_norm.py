"""Norm rules: BatchNorm / FrozenBatchNorm2d / InstanceNorm per channel, GroupNorm by whole groups, LayerNorm
(channels-last after a permute) frozen with a reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check, units_of


class ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module, c: int = 16) -> None:
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(3, c, 3, padding=1), norm, nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def _randomize(norm: nn.Module) -> nn.Module:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(norm, name, None)
        if isinstance(t, torch.Tensor):
            with torch.no_grad():
                t.copy_(torch.rand_like(t) + 0.5)
    return norm


@pytest.mark.parametrize("norm", [
    nn.BatchNorm2d(16), FrozenBatchNorm2d(16), nn.InstanceNorm2d(16, affine=True), nn.GroupNorm(4, 16),
], ids=["batchnorm", "frozen_bn", "instancenorm", "groupnorm"])
def test_norm_masked_equals_shrunk(norm: nn.Module) -> None:
    model = ConvNorm(_randomize(norm)).eval()
    pruned = prune_and_check(model, channel_recipe(0.5), torch.randn(2, 3, 6, 6))
    assert pruned.conv1.out_channels == 8
    assert pruned.norm.weight.shape == (8,)


def test_groupnorm_units_are_groups_and_groups_shrink() -> None:
    model = ConvNorm(_randomize(nn.GroupNorm(4, 16))).eval()
    a = analyze_model(model, torch.randn(1, 3, 6, 6))
    u = units_of(a, "@norm:0:0").reshape(4, 4)
    assert all(len(set(row)) == 1 for row in u) and len(np.unique(u)) == 4
    pruned = prune_and_check(model, channel_recipe(0.5), torch.randn(2, 3, 6, 6))
    assert pruned.norm.num_groups == 2 and pruned.norm.num_channels == 8


class ChannelsLastLN(nn.Module):
    """ConvNeXt-style: depthwise conv, permute to channels-last, LayerNorm, MLP, permute back, residual."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.ln = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(y)))).permute(0, 3, 1, 2)
        return self.head(x + y)


def test_layernorm_channels_last_freezes_stream_and_prunes_mlp() -> None:
    model = ChannelsLastLN().eval()
    x = torch.randn(2, 3, 5, 5)
    a = analyze_model(model, x)
    assert frozen_of(a, "@stem:0:0").all()  # the residual stream goes through LayerNorm statistics
    assert not frozen_of(a, "@fc1:0:0").any()
    reasons = {r for rs in a.reasons.values() for r in rs}
    assert any("LayerNorm statistics" in r for r in reasons)
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.fc1.out_features == 16 and pruned.ln.normalized_shape == (8,)
    assert any("LayerNorm" in r for g in pruned.fxprune_plan.frozen for r in g["reasons"])


class FunctionalBN(nn.Module):
    """A BatchNorm subclass calling ``F.batch_norm`` on its own tensors, then an activation (timm's BatchNormAct2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.bn = _randomize(nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.batch_norm(self.conv1(x), self.bn.running_mean, self.bn.running_var,
                                           self.bn.weight, self.bn.bias, False, 0.1, 1e-5)
        return self.conv2(torch.relu(y))


def test_functional_batch_norm_shrinks_its_tensors() -> None:
    model = FunctionalBN().eval()
    pruned = prune_and_check(model, channel_recipe(0.5), torch.randn(2, 3, 5, 5))
    assert pruned.conv1.out_channels == 4
    assert pruned.bn.running_mean.shape == pruned.bn.weight.shape == (4,)
