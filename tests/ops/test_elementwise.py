"""Pass-through rules: residual add/sub/mul, SE-style broadcast mul, activations, dropout, identity, pooling,
adaptive pooling, upsampling, mean reduction and softmax; masked == shrunk for each."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check, units_of


class Residual(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = {"add": lambda: s + self.a(s), "sub": lambda: torch.sub(self.a(s), self.b(s)),
             "mul": lambda: self.a(s) * torch.sigmoid(self.b(s))}[self.op]()
        return self.head(y)


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_residual_ties_both_branches(op: str) -> None:
    model = Residual(op).eval()
    x = torch.randn(2, 3, 6, 6)
    a = analyze_model(model, x)
    np.testing.assert_array_equal(units_of(a, "@a:0:0"), units_of(a, "@b:0:0" if op != "add" else "@stem:0:0"))
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.a.out_channels == 4


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 5)
        self.ident = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        x = self.ident(x * s)
        return self.head(self.drop(x.mean((2, 3))))


def test_se_broadcast_mul_couples_excitation_with_features() -> None:
    model = SqueezeExcite().eval()
    x = torch.randn(2, 3, 6, 6)
    a = analyze_model(model, x)
    np.testing.assert_array_equal(units_of(a, "@conv:0:0"), units_of(a, "@fc2:0:0"))
    assert not frozen_of(a, "@fc1:0:0").any()
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert (pruned.conv.out_channels, pruned.fc1.out_channels, pruned.fc2.out_channels) == (8, 4, 8)


class PoolingZoo(nn.Module):
    def __init__(self, channel_mean: bool = False) -> None:
        super().__init__()
        self.channel_mean = channel_mean
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ops = nn.Sequential(nn.MaxPool2d(2), nn.ReLU6(), nn.Upsample(scale_factor=2), nn.AvgPool2d(2),
                                 nn.Dropout2d(0.2), nn.SiLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops(self.conv(x))
        y = F.interpolate(F.adaptive_max_pool2d(y, 2), size=(3, 3))
        gate = torch.softmax(y.mean(1 if self.channel_mean else 2, keepdim=True), dim=-1)
        return self.head(F.pad(y * gate, (1, 1, 1, 1)))


def test_pooling_activation_chain_passes_channels() -> None:
    model = PoolingZoo().eval()
    x = torch.randn(2, 3, 8, 8)
    a = analyze_model(model, x)
    assert not frozen_of(a, "@conv:0:0").any()
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned(x).shape == model(x).shape


def test_mean_over_channels_freezes_them() -> None:
    model = PoolingZoo(channel_mean=True).eval()
    a = analyze_model(model, torch.randn(2, 3, 8, 8))
    assert frozen_of(a, "@conv:0:0").all()  # y.mean(1) averages over channels: pruning would change it


class Casts(nn.Module):
    """Casts whose other argument lends only its dtype: ``type_as`` a 5-d tensor, ``to`` a 1-d one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 3, 1)
        self.register_buffer("like", torch.zeros(2, 3, 4, 5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x)).type_as(self.like)
        h = self.mid(h).to(self.like.new_zeros(1)).type(torch.float32)
        gate = torch.sigmoid(h.mean((0, 2, 3))).type_as(h)  # a 1-d tensor cast like a 4-d one
        return self.head(torch.relu(h) * gate.view(1, -1, 1, 1))


def test_casts_tie_only_their_input() -> None:
    model = Casts().eval()
    x = torch.randn(2, 3, 6, 6)
    a = analyze_model(model, x)
    assert len(units_of(a, "@stem:0:0")) == 8 and not frozen_of(a, "@stem:0:0").any()
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.stem.out_channels == 4
