"""Convolution rule: coupling of plain, grouped (in != out), depthwise and transposed convs; masked == shrunk."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.testing import analyze_model, prune_and_check
from fxprune.testing import channel_recipe as recipe
from fxprune.testing import frozen_of as frozen
from fxprune.testing import units_of as units


class ConvChain(nn.Module):
    def __init__(self, conv: nn.Module, dims: int = 2) -> None:
        super().__init__()
        Conv = nn.Conv1d if dims == 1 else nn.Conv2d
        Norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.stem = Conv(3, conv.in_channels, 3, padding=1)
        self.bn = Norm(conv.in_channels)
        self.conv = conv
        self.head = Conv(conv.out_channels, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.bn(self.stem(x))))))


@pytest.mark.parametrize("conv, dims", [
    (nn.Conv2d(16, 24, 3, padding=1), 2),
    (nn.Conv1d(16, 24, 3, padding=1), 1),
    (nn.Conv2d(16, 16, 3, padding=1, groups=16), 2),  # depthwise
    (nn.Conv2d(16, 32, 3, padding=1, groups=16), 2),  # depthwise with channel multiplier 2
    (nn.Conv2d(12, 20, 3, padding=1, groups=4), 2),  # grouped, in != out
    (nn.ConvTranspose2d(16, 24, 2, stride=2), 2),
    (nn.ConvTranspose2d(8, 12, 3, padding=1, groups=4), 2),
], ids=["conv2d", "conv1d", "depthwise", "depthwise_x2", "grouped_in_ne_out", "transpose", "grouped_transpose"])
def test_conv_masked_equals_shrunk(conv: nn.Module, dims: int) -> None:
    model = ConvChain(conv, dims).eval()
    x = torch.randn(2, 3, *([10] * dims))
    pruned = prune_and_check(model, recipe(0.5), x)
    assert pruned.conv.out_channels < conv.out_channels
    assert pruned.conv.in_channels < conv.in_channels
    assert pruned(x).shape == model(x).shape


def test_plain_conv_units_are_single_channels() -> None:
    a = analyze_model(ConvChain(nn.Conv2d(16, 24, 3, padding=1)), torch.randn(1, 3, 8, 8))
    out = units(a, "@conv:0:0")
    assert len(np.unique(out)) == 24  # each output channel is its own unit
    np.testing.assert_array_equal(units(a, "@stem:0:0"), units(a, "@conv:0:1"))  # stem out == conv in
    np.testing.assert_array_equal(units(a, "@bn:0:0"), units(a, "@conv:0:1"))
    assert frozen(a, "@stem:0:1").all()  # model input channels
    assert frozen(a, "@head:0:0").all()  # model output channels


def test_grouped_conv_units_are_whole_groups() -> None:
    a = analyze_model(ConvChain(nn.Conv2d(12, 20, 3, padding=1, groups=4)), torch.randn(1, 3, 8, 8))
    u_in, u_out = units(a, "@conv:0:1"), units(a, "@conv:0:0")
    assert len(np.unique(u_in)) == 4
    np.testing.assert_array_equal(u_in.reshape(4, 3)[:, 0], u_out.reshape(4, 5)[:, 0])
    assert all(len(set(row)) == 1 for row in u_out.reshape(4, 5))


def test_grouped_conv_shrinks_groups() -> None:
    model = ConvChain(nn.Conv2d(12, 20, 3, padding=1, groups=4)).eval()
    pruned = prune_and_check(model, recipe(0.5), torch.randn(2, 3, 8, 8))
    assert (pruned.conv.groups, pruned.conv.in_channels, pruned.conv.out_channels) == (2, 6, 10)
    assert pruned.conv.weight.shape == (10, 3, 3, 3)


def test_channels_last_weights_stay_channels_last() -> None:
    """A model the user converted to channels_last keeps that layout in every shrunk conv weight."""
    model = ConvChain(nn.Conv2d(16, 24, 3, padding=1)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    pruned = prune_and_check(model, recipe(0.5), x)
    for name in ("stem", "conv"):  # (the 1x1 head's weight is contiguous in both layouts)
        w = pruned.get_submodule(name).weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(), name
    assert pruned.conv.weight.shape[:2] != model.conv.weight.shape[:2]  # it really was shrunk
