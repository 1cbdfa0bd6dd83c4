"""fxprune.compile end to end on a small residual + concat net: scopes, targets, round_to, ignore, report."""
from __future__ import annotations

import pytest
import torch
from fixtures import ResCatNet
from torch import nn

import fxprune
from fxprune.testing import channel_recipe, prune_and_check
from fxprune.work import count_work


def rescat() -> nn.Module:
    """The shared residual + concat toy at the sizes this file expects."""
    return ResCatNet(width=32, fuse=32, classes=10)


X = torch.randn(2, 3, 12, 12)


def _macs(m: nn.Module) -> int:
    return count_work(m, X)["macs"]


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_budgets_are_met_within_two_percent(scope: str, kind: str) -> None:
    model = rescat().eval()
    pruned = prune_and_check(model, channel_recipe(0.4, kind, scope=scope, criterion="l1"), X)
    if kind == "flops":
        assert abs(1 - _macs(pruned) / _macs(model) - 0.4) < 0.02
    else:
        ratio = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
        assert abs(1 - ratio - 0.4) < 0.02


def test_round_to_and_ignore() -> None:
    model = rescat().eval()
    pruned = prune_and_check(model, channel_recipe(0.6, round_to=8, ignore=["side"]), X)
    assert pruned.get_submodule("body.0").out_channels % 8 == 0 and pruned.get_submodule("body.0").out_channels < 64
    assert pruned.side.out_channels == 16 and pruned.side.in_channels == 32  # ignored: untouched
    assert pruned.fc.out_features == 10  # the output layer never shrinks


def test_sparsity_zero_is_identity_and_bn_scale_criterion() -> None:
    model = rescat().eval()
    same = prune_and_check(model, channel_recipe(0.0), X)
    assert same.fxprune_plan.empty
    pruned = prune_and_check(model, channel_recipe(0.5, criterion="bn_scale"), X)
    assert pruned.get_submodule("body.0").out_channels == 32


def test_report_lists_widths_ratios_and_frozen_groups() -> None:
    model = rescat().eval()
    pruned = fxprune.compile(model, channel_recipe(0.5, "flops"), example_inputs=X)
    rep = fxprune.report(model, pruned, X)
    assert rep.macs[0] == _macs(model) and 0.45 < rep.macs_ratio < 0.52
    assert rep.params_ratio < 1
    body = pruned.get_submodule("body.0")
    assert ("body.0", "Conv2d", (32, 64), (body.in_channels, body.out_channels)) in rep.layers
    text = str(rep)
    assert "MACs" in text and "body.0" in text and "frozen groups" in text and "model input" in text
