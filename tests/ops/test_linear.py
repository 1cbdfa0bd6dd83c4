"""Linear rule: flatten/view feeding Linear, token-major (B, N, C) linears; masked == shrunk."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check, units_of


class ConvFlattenLinear(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.reshape(2, 32)
        return self.fc2(torch.relu(self.fc1(x)))


def test_flatten_ties_channel_to_its_features() -> None:
    a = analyze_model(ConvFlattenLinear("flatten"), torch.randn(2, 3, 8, 8))
    conv, fc_in = units_of(a, "@conv:0:0"), units_of(a, "@fc1:0:1")
    np.testing.assert_array_equal(np.repeat(conv, 4), fc_in)  # channel c owns features 4c..4c+3
    assert not frozen_of(a, "@conv:0:0").any()


def test_flatten_view_reshape_masked_equals_shrunk() -> None:
    x = torch.randn(2, 3, 8, 8)
    for how in ("flatten", "view", "reshape"):
        model = ConvFlattenLinear(how).eval()
        pruned = prune_and_check(model, channel_recipe(0.5), x)
        assert pruned.conv.out_channels == 4 and pruned.fc1.in_features == 16 and pruned.fc1.out_features == 8


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 48), nn.Linear(48, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def test_token_linear_prunes_hidden_only() -> None:
    x = torch.randn(2, 7, 12)
    pruned = prune_and_check(TokenMLP().eval(), channel_recipe(0.5), x)
    assert pruned.fc1.out_features == 24 and pruned.fc2.out_features == 12  # residual stream is the input
