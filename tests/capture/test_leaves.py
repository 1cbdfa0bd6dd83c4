"""Automatic partial graphs: an untraceable submodule becomes a leaf (logged, reported), the rest is pruned, a
child that traces is not swallowed; ``strict_trace: true`` restores the error."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fxprune
from fxprune.capture import capture_info
from fxprune.errors import TraceFailure
from fxprune.testing import channel_recipe, prune_and_check, state_digest


class DataGate(nn.Module):
    """Value-dependent control flow (cannot be traced), around a child that traces."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.inner(x)
        return y if y.mean() > 0 else -y


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))
        self.gate = DataGate(16)
        self.head = nn.Sequential(nn.Conv2d(16, 24, 1), nn.ReLU(), nn.Conv2d(24, 8, 1))

    def forward(self, x, **kwargs):
        return self.head(self.gate(self.body(self.stem(x))))


def test_untraceable_submodule_becomes_reported_leaf_and_rest_prunes(caplog):
    model = GatedNet().eval()
    before = state_digest(model)
    x = torch.randn(1, 3, 12, 12)
    with caplog.at_level(logging.WARNING, logger="fxprune.capture.leaves"):
        pruned = prune_and_check(model, channel_recipe(0.5), (x,))
    assert state_digest(model) == before
    assert any("auto leaf 'gate' (DataGate)" in r.getMessage() for r in caplog.records)
    info = capture_info(pruned)
    assert [n.path for n in info.leaves] == ["gate"] and "y.mean() > 0" in info.leaves[0].where
    # the rest is pruned (stem/body/head hidden channels), the leaf's channels are not
    assert pruned.get_submodule("body.0").out_channels < 32 and pruned.get_submodule("head.0").out_channels < 24
    assert pruned.get_submodule("gate").inner.out_channels == 16
    report = fxprune.report(model, pruned, (x,))
    assert "auto leaf 'gate'" in str(report) and report.params[1] < report.params[0]


def test_leaf_is_the_innermost_failing_module():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1))
            self.gate = DataGate(16)

        def forward(self, x):
            return self.gate(self.pre(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Outer()
            self.out = nn.Conv2d(16, 4, 1)

        def forward(self, x, **kwargs):
            return self.out(self.block(x))

    pruned = prune_and_check(Net().eval(), channel_recipe(0.5), (torch.randn(1, 3, 8, 8),))
    assert [n.path for n in capture_info(pruned).leaves] == ["block.gate"]  # not "block": its child 'pre' traces
    assert pruned.get_submodule("block.pre.0").out_channels < 16


def test_strict_trace_restores_the_error():
    recipe = {**channel_recipe(0.5), "strict_trace": True}
    with pytest.raises(TraceFailure, match=r"module 'gate' \(DataGate\).*y.mean\(\) > 0"):
        fxprune.compile(GatedNet().eval(), recipe, example_inputs=torch.randn(1, 3, 12, 12))
    assert fxprune.recipe.Recipe.load(recipe).to_dict()["strict_trace"] is True
