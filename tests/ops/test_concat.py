"""Concatenation rule: offsets into the output, nested cats, cat-of-cats added together, a producer feeding
several slices of one cat (YOLO/SPPF-style), stack."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check, units_of


class CatOfCatsAdded(nn.Module):
    """cat(cat(a, b), c) + cat(d, cat(e, f)): every input's channels map through two levels of offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        widths = {"a": 4, "b": 6, "c": 6, "d": 8, "e": 2, "f": 6}
        self.branches = nn.ModuleDict({k: nn.Conv2d(8, w, 3, padding=1) for k, w in widths.items()})
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        b = {k: m(s) for k, m in self.branches.items()}
        left = torch.cat([torch.cat([b["a"], b["b"]], 1), b["c"]], 1)
        right = torch.cat([b["d"], torch.cat([b["e"], b["f"]], dim=1)], 1)
        return self.head(left + right)


def test_cat_of_cats_added_couples_by_offset() -> None:
    model = CatOfCatsAdded().eval()
    x = torch.randn(2, 3, 5, 5)
    a = analyze_model(model, x)
    left = np.concatenate([units_of(a, f"@branches.{k}:0:0") for k in "abc"])
    right = np.concatenate([units_of(a, f"@branches.{k}:0:0") for k in "def"])
    np.testing.assert_array_equal(left, right)
    np.testing.assert_array_equal(left, units_of(a, "@head:0:1"))
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.head.in_channels == 8
    widths = [pruned.get_submodule(f"branches.{k}").out_channels for k in "abcdef"]
    assert sum(widths[:3]) == sum(widths[3:]) == 8


class SPPF(nn.Module):
    """One producer feeds four slices of one cat through chained max-pools (YOLOv5/v8 SPPF)."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1, self.cv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(32, 6, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


def test_producer_feeding_several_slices_of_one_cat() -> None:
    model = SPPF().eval()
    x = torch.randn(2, 3, 7, 7)
    a = analyze_model(model, x)
    u = units_of(a, "@cv2:0:1").reshape(4, 8)
    assert (u == u[0]).all()  # the same channel of cv1 appears at 4 offsets
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.cv1.out_channels == 4 and pruned.cv2.in_channels == 16


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.stack([self.a(x), self.b(x)], 1).sum(1))


def test_stack_ties_inputs_and_freezes_new_dim() -> None:
    model = Stack().eval()
    x = torch.randn(3, 5)
    a = analyze_model(model, x)
    np.testing.assert_array_equal(units_of(a, "@a:0:0"), units_of(a, "@b:0:0"))
    assert not frozen_of(a, "@a:0:0").any()
    stack = next(s for s in a.spaces if s.owner == "stack" and s.dim == 1)
    assert a.unit_frozen[units_of(a, stack.key())].all()  # the new dim is reduced away: frozen
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.a.out_features == pruned.b.out_features == 4
