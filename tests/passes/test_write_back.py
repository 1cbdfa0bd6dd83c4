"""``output="module"`` on small models: the user's class comes back shrunk, literal sizes are refused naming the
node and its source line (graph mode still works), ``chunk`` halves stay even, attributes the forward reads are
updated, module swaps land on the user's tree, and the user's model is never modified."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ModuleModeError
from fxprune.testing import assert_module_matches, channel_recipe, state_digest

X = torch.randn(2, 3, 16, 16)


class LiteralView(nn.Module):
    """A forward that hard-codes the channel count: module mode cannot make it follow the pruned conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).relu()
        y = y.view(x.shape[0], 32, -1).mean(-1)
        return self.head(y)


class AttributeView(LiteralView):
    """The same computation, with the channel count read from an attribute: module mode updates it."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).relu()
        return self.head(y.view(x.shape[0], self.width, -1).mean(-1))


class ChunkNet(nn.Module):
    """YOLOv8's C2f in small: ``cv1(x).chunk(2, 1)``, a residual on the second half, a concat, ``cv2``."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m = nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(24, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, b + self.m(b).relu()], 1))


def test_literal_size_is_refused_naming_node_and_line_graph_mode_works() -> None:
    model = LiteralView().eval()
    with pytest.raises(ModuleModeError, match=r"(?s)%view.*test_write_back.py:\d+: y = y.view\(x.shape\[0\], 32, "
                                              r"-1\).*constant 32 to 16.*output='graph'"):
        fxprune.compile(model, channel_recipe(0.5), example_inputs=X, output="module")
    pruned = fxprune.compile(model, channel_recipe(0.5), example_inputs=X)
    assert pruned.conv.out_channels == 16


def test_attribute_the_forward_reads_is_updated() -> None:
    model = AttributeView().eval()
    before = state_digest(model)
    result = fxprune.compile(model, channel_recipe(0.5), example_inputs=X, output="module")
    assert type(result) is AttributeView and result.width == result.conv.out_channels == 16
    assert model.width == 32 and state_digest(model) == before  # the user's model is untouched
    assert_module_matches(model, result, X, torch.randn(3, 3, 24, 24))


def test_chunk_halves_stay_even() -> None:
    model = ChunkNet().eval()
    result = fxprune.compile(model, channel_recipe(0.5), example_inputs=X, output="module")
    assert result.fxprune_plan.options == {"chunks": "even"}
    assert result.cv1.out_channels % 2 == 0 and result.m.in_channels == result.cv1.out_channels // 2
    assert_module_matches(model, result, X, torch.randn(1, 3, 20, 20))


class SplitChunkNet(ChunkNet):
    """C2f's second forward: ``split((self.c, self.c), 1)``, which Ultralytics' exporter switches to."""

    def __init__(self) -> None:
        super().__init__()
        self.c = 8

    def forward_split(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat([a, b, b + self.m(b).relu()], 1))


def test_chunk_width_attribute_follows_for_an_alternative_split_forward() -> None:
    model = SplitChunkNet().eval()
    result = fxprune.compile(model, channel_recipe(0.5), example_inputs=X, output="module")
    assert result.cv1.out_channels < 16 and result.c == result.cv1.out_channels // 2 and model.c == 8
    torch.testing.assert_close(result.forward_split(X), result(X), rtol=0, atol=0)


def test_blocksparse_swap_lands_on_the_users_tree() -> None:
    from fxprune.nn.blocksparse_linear import BlockSparseLinear

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    x = torch.randn(4, 32)
    recipe = {"stages": [{"kind": "blocksparse", "target": {"sparsity": 0.5}, "block": [16, 16], "criterion": "l2"}]}
    result = fxprune.compile(model, recipe, example_inputs=x, output="module")
    assert type(result) is nn.Sequential and any(isinstance(m, BlockSparseLinear) for m in result)
    assert_module_matches(model, result, x, torch.randn(7, 32))


def test_bad_output_and_submodule_are_refused() -> None:
    with pytest.raises(ValueError, match="output must be one of 'graph', 'module'"):
        fxprune.compile(ChunkNet(), channel_recipe(0.5), example_inputs=X, output="modules")
    with pytest.raises(ModuleModeError, match="submodule"):
        fxprune.compile(ChunkNet(), {**channel_recipe(0.5), "submodule": "cv1"}, example_inputs=X, output="module")


def test_training_flags_are_kept() -> None:
    model = ChunkNet().train()
    model.m.eval()
    result = fxprune.compile(model, channel_recipe(0.5), example_inputs=X, output="module")
    assert result.training and result.cv1.training and not result.m.training
