"""Weight-standardized convs (timm ``StdConv2d``, ``ScaledStdConv2d`` and their ``Same`` variants): output channels
shrink in place, removed input channels are pinned into the filter statistics (``fxprune.nn.PinnedStdConv2d``),
grouped ones lose whole groups; masked == shrunk for each."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.nn import PinnedStdConv2d
from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check, units_of

layers = pytest.importorskip("timm.layers")


class StdConvNet(nn.Module):
    """stem (plain conv) -> a -> b -> head; ``a`` and ``b`` are weight-standardized."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, a.in_channels, 3, padding=1), a, b
        self.head = nn.Conv2d(b.out_channels, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.b(F.gelu(self.a(F.gelu(self.stem(x)))))))


def _randomize(model: nn.Module) -> nn.Module:
    """Gains and biases away from their init, so slicing them wrongly shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gain", "bias")):
                p.uniform_(0.5, 1.5)
    return model.eval()


CASES = {
    "scaled": lambda: (layers.ScaledStdConv2d(8, 16, 3), layers.ScaledStdConv2d(16, 12, 1)),
    "std": lambda: (layers.StdConv2d(8, 16, 3, bias=True), layers.StdConv2d(16, 12, 3)),
    "scaled_same_dynamic": lambda: (layers.ScaledStdConv2dSame(8, 16, 3, stride=2),
                                    layers.ScaledStdConv2dSame(16, 12, 3)),
    "std_same": lambda: (layers.StdConv2dSame(8, 16, 3, stride=2), layers.StdConv2dSame(16, 12, 1)),
    "scaled_grouped": lambda: (layers.ScaledStdConv2d(8, 16, 3, groups=4), layers.ScaledStdConv2d(16, 12, 3, groups=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_std_conv_masked_equals_shrunk(case: str) -> None:
    torch.manual_seed(0)
    model = _randomize(StdConvNet(*CASES[case]()))
    x = torch.randn(2, 3, 11, 11)
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.a.out_channels < 16 and pruned.b.in_channels < 16 and pruned.b.out_channels < 12
    if case == "scaled_grouped":  # whole groups go: the timm modules stay, with fewer groups
        assert type(pruned.b) is layers.ScaledStdConv2d and pruned.b.groups < 4
    else:  # input channels removed: the statistics are pinned
        assert isinstance(pruned.a, PinnedStdConv2d) and isinstance(pruned.b, PinnedStdConv2d)
    gain = getattr(pruned.b, "gain", None)
    assert gain is None or gain.shape[0] == pruned.b.out_channels
    assert pruned(x).shape == model(x).shape


def test_outputs_only_keep_the_timm_module() -> None:
    """A std conv fed by the model input loses output channels only and stays the timm class."""
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(layers.ScaledStdConv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)))
    x = torch.randn(2, 3, 8, 8)
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    conv = pruned.get_submodule("0")
    assert type(conv) is layers.ScaledStdConv2d and conv.out_channels == 8 and conv.gain.shape == (8, 1, 1, 1)


def test_pinning_twice_accumulates_removed_statistics() -> None:
    """Two pruning steps: the second removes inputs of an already pinned conv (plan composed over both)."""
    torch.manual_seed(0)
    model = _randomize(StdConvNet(*CASES["scaled"]()))
    pruned = prune_and_check(model, channel_recipe(0.6, steps=2), torch.randn(2, 3, 9, 9))
    assert isinstance(pruned.b, PinnedStdConv2d) and pruned.b.in_channels < 8
    assert pruned.b.fan_in == 16  # the original filters' size


def test_std_conv_coupling() -> None:
    torch.manual_seed(0)
    model = StdConvNet(layers.ScaledStdConv2d(8, 16, 3), layers.ScaledStdConv2d(16, 12, 3, groups=4))
    a = analyze_model(model, torch.randn(1, 3, 8, 8))
    assert len(np.unique(units_of(a, "@a:0:1"))) == 8  # each input channel of a is a unit
    np.testing.assert_array_equal(units_of(a, "@a:0:0"), units_of(a, "@b:0:1"))  # a's filters feed b...
    assert len(np.unique(units_of(a, "@a:0:0"))) == 4  # ...whose 4 groups make them 4 units
    np.testing.assert_array_equal(units_of(a, "@stem:0:0"), units_of(a, "@a:0:1"))
    assert not frozen_of(a, "@a:0:1").any() and not frozen_of(a, "@a:0:0").any()
    u_out = units_of(a, "@b:0:0").reshape(4, 3)  # grouped: one unit per group of b
    assert all(len(set(row)) == 1 for row in u_out) and len(np.unique(u_out)) == 4
    assert frozen_of(a, "@head:0:0").all()


def test_pinned_conv_equals_original_with_zeroed_inputs() -> None:
    """Independent of the plan machinery: ``PinnedStdConv2d.remove_inputs`` vs the timm conv on zeroed inputs."""
    torch.manual_seed(0)
    conv = _randomize(layers.ScaledStdConv2d(6, 4, 3, padding=1))
    keep = torch.tensor([0, 2, 3])
    x = torch.randn(2, 6, 7, 7)
    zeroed = x.clone()
    zeroed[:, [1, 4, 5]] = 0
    pinned = PinnedStdConv2d.from_timm(conv)
    torch.testing.assert_close(pinned(x), conv(x), atol=1e-5, rtol=1e-5)
    pinned.remove_inputs(keep)
    assert pinned.weight.shape == (4, 3, 3, 3) and pinned.in_channels == 3
    torch.testing.assert_close(pinned(x[:, keep]), conv(zeroed), atol=1e-5, rtol=1e-5)


def test_pinned_conv_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomize(StdConvNet(*CASES["scaled"]()))
    x = torch.randn(1, 3, 8, 8)
    pruned = fxprune.compile(model, channel_recipe(0.5), example_inputs=x)
    loaded = fxprune.load(fxprune.save(pruned, tmp_path / "m.fxp", example_inputs=x), model, x)
    assert isinstance(loaded.a, PinnedStdConv2d)
    torch.testing.assert_close(loaded.a.removed_sq_sum, pruned.a.removed_sq_sum)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_pinned_conv_compiles_without_graph_breaks() -> None:
    from fxprune.testing import assert_compiles

    torch.manual_seed(0)
    model = _randomize(StdConvNet(*CASES["scaled_same_dynamic"]()))
    x = torch.randn(1, 3, 9, 9)
    pruned = fxprune.compile(model, channel_recipe(0.5), example_inputs=x)
    assert isinstance(pruned.a, PinnedStdConv2d)
    assert_compiles(pruned, x)
