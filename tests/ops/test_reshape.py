"""Reshape-family rules: channel shuffle, view/unflatten with constant sizes, permute/transpose, expand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.ops.reshape import reshape_blocks
from fxprune.testing import analyze_model, channel_recipe, prune_and_check, units_of


@pytest.mark.parametrize("a, b, blocks", [
    ((2, 12, 5), (2, 3, 4, 5), [([0], [0]), ([1], [1, 2]), ([2], [3])]),
    ((2, 8, 3, 3), (2, 72), [([0], [0]), ([1, 2, 3], [1])]),
    ((1, 6, 1), (6,), [([1], [0])]),
])
def test_reshape_blocks(a: tuple, b: tuple, blocks: list) -> None:
    assert reshape_blocks(a, b) == blocks


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)


class Shuffle(nn.Module):
    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(channel_shuffle(torch.cat([self.a(x), self.b(x)], 1), self.groups))


def test_channel_shuffle_ties_matching_positions_of_each_group() -> None:
    a = analyze_model(Shuffle(), torch.randn(1, 3, 4, 4))
    # channel j of branch a and channel j of branch b sit side by side after the shuffle: one unit
    np.testing.assert_array_equal(units_of(a, "@a:0:0"), units_of(a, "@b:0:0"))
    np.testing.assert_array_equal(units_of(a, "@head:0:1")[0::2], units_of(a, "@a:0:0"))


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_masked_equals_shrunk(groups: int) -> None:
    x = torch.randn(2, 3, 4, 4)
    pruned = prune_and_check(Shuffle(groups).eval(), channel_recipe(0.5), x)
    assert pruned.head.in_channels < 12 and pruned.head.in_channels % groups == 0


class ConstantView(nn.Module):
    """Heads-like constant-size view and permute: (B, N, 12) -> (B, N, 3, 4) -> permute -> back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 12), nn.Linear(12, 5)
        self.scale = nn.Parameter(torch.rand(1, 1, 12) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.fc1(x) * self.scale.expand(2, 7, 12)).view(2, 7, 3, 4).permute(0, 2, 1, 3)
        y = y.transpose(1, 2).reshape(2, 7, 12)
        return self.fc2(torch.relu(y))


def test_constant_view_sizes_are_rewritten() -> None:
    x = torch.randn(2, 7, 5)
    pruned = prune_and_check(ConstantView().eval(), channel_recipe(0.5), x)
    assert pruned.fc1.out_features == 6 and pruned.scale.shape == (1, 1, 6)
