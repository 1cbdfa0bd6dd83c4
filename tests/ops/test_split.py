"""Split rules: split/chunk/tensor_split into cat (CSP/C2f-style), unbind, tuple getitem, tensor slicing."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check, units_of


class SplitCat(nn.Module):
    """C2f-style: a conv split in two halves, one half through convs, everything concatenated."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m1, self.m2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        if self.how == "split":
            a, b = torch.split(y, [8, 8], dim=1)
        elif self.how == "chunk":
            a, b = y.chunk(2, 1)
        else:
            a, b = y[:, :8], y[:, 8:]
        c = self.m1(b)
        d = self.m2(c) + c
        return self.cv2(torch.cat([a, b, c, d], 1))


def test_split_maps_halves_to_their_cat_offsets() -> None:
    a = analyze_model(SplitCat("split"), torch.randn(1, 3, 4, 4))
    cv1 = units_of(a, "@cv1:0:0")
    cv2_in = units_of(a, "@cv2:0:1")
    np.testing.assert_array_equal(cv2_in[:16], cv1)
    np.testing.assert_array_equal(cv2_in[8:16], units_of(a, "@m1:0:1"))


def test_split_chunk_slice_then_cat_masked_equals_shrunk() -> None:
    x = torch.randn(2, 3, 5, 5)
    for how in ("split", "chunk", "slice"):
        model = SplitCat(how).eval()
        pruned = prune_and_check(model, channel_recipe(0.5), x)
        # one group (the cat joins cv1 with m1/m2): 24 units, half of them removed
        assert pruned.cv1.out_channels + pruned.m1.out_channels == 12
        assert pruned.cv2.in_channels == pruned.cv1.out_channels + 2 * pruned.m1.out_channels


def test_uneven_chunks_after_pruning_become_split_sizes() -> None:
    model = SplitCat("chunk").eval()
    with torch.no_grad():
        model.cv1.weight[:6] *= 1e-3  # the first half's channels are the weakest: pruned first
    pruned = prune_and_check(model, channel_recipe(0.5), torch.randn(2, 3, 5, 5))
    targets = [n.target for n in pruned.graph.nodes if n.op in ("call_function", "call_method")]
    assert torch.split in targets and "chunk" not in targets
    halves = [n for n in pruned.graph.nodes if n.target is torch.split][0].args[1]
    assert halves[0] != halves[1]  # the two halves were pruned unevenly, which chunk could not express


class Unbind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 3 * 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], 3, 8).unbind(1)
        return self.out(q * k + v)


def test_unbind_couples_the_three_parts() -> None:
    model = Unbind().eval()
    x = torch.randn(4, 6)
    a = analyze_model(model, x)
    u = units_of(a, "@qkv:0:0").reshape(3, 8)
    assert (u == u[0]).all()  # q, k, v channel i go together
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.qkv.out_features == 12 and pruned.out.in_features == 4


class ConstantIndex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x)[:, 5:6] * self.conv(x)[:, 2, None])


def test_constant_index_freezes_the_picked_channel_only() -> None:
    model = ConstantIndex().eval()
    x = torch.randn(2, 3, 4, 4)
    a = analyze_model(model, x)
    fro = frozen_of(a, "@conv:0:0")
    assert fro[2] and fro[5] and not fro[[0, 1, 3, 4, 6, 7]].any()
    prune_and_check(model, channel_recipe(0.5), x)


class NegativeItem(nn.Module):
    """Res2Net-style: split by a size, run the first pieces through convs, append ``spx[-1]`` untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1, self.m, self.cv2 = nn.Conv2d(3, 12, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.cv1(x), 4, 1)
        return self.cv2(torch.cat([self.m(spx[0]), spx[1], spx[-1]], 1))


def test_negative_tuple_index_is_the_last_item() -> None:
    model = NegativeItem().eval()
    x = torch.randn(2, 3, 5, 5)
    a = analyze_model(model, x)
    np.testing.assert_array_equal(units_of(a, "@cv2:0:1")[8:], units_of(a, "@cv1:0:0")[8:])
    with torch.no_grad():
        model.cv1.weight[8:] *= 1e-3  # the last piece is weakest: pruned unevenly
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.cv2.in_channels < 12


class StridedSliceFeatures(nn.Module):
    """EdgeNeXt-style Fourier features: a constant tensor sliced with a step (``0::2``/``1::2``), stacked and fed to a
    conv. The strided slices have no kept-range rewrite, so the conv's input channels must stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.mean(1, keepdim=True).permute(0, 2, 3, 1) * torch.arange(8, dtype=torch.float32)
        feats = torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=4).flatten(3).permute(0, 3, 1, 2)
        return self.head(self.proj(feats))


def test_strided_slice_freezes_both_sides() -> None:
    model = StridedSliceFeatures().eval()
    x = torch.randn(2, 3, 4, 4)
    a = analyze_model(model, x)
    assert frozen_of(a, "@proj:0:1").all()
    assert not frozen_of(a, "@proj:0:0").all()
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.proj.in_channels == 8 and pruned.proj.out_channels < 6


class ReadsOwnWeight(nn.Module):
    """EdgeNeXt-style: a module's weight is read directly (``.dtype``) besides the module being called."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x.to(self.proj.weight.dtype)))


def test_attribute_of_a_called_module_is_not_a_second_owner() -> None:
    model = ReadsOwnWeight().eval()
    x = torch.randn(2, 3, 4, 4)
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.proj.out_channels == 4 and pruned.proj.weight.shape[1] == 3
