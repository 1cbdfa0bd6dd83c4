"""``scope: "module"`` (DIMAP, arXiv 2404.13648): one threshold per module family, the same rate in every family."""
from __future__ import annotations

import pytest
import torch
from fixtures import ResCatNet
from torch import nn

import fxprune
from fxprune.errors import RecipeError
from fxprune.testing import channel_recipe, prune_and_check
from fxprune.work import count_model


class Chain(nn.Module):
    """l1 -> l2 -> l3 -> l4; groups: l1|l2 (8 units), l2|l3 (8), l3|l4 (8). l2's channels are weak, l3's strong."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        with torch.no_grad():
            self.l2.weight.mul_(0.01)
            self.l4.weight.mul_(100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l4(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


X = torch.randn(3, 4)


def test_one_threshold_per_family_same_rate_per_family() -> None:
    recipe = channel_recipe(0.5, criterion="l1", scope="module", modules={"a": ["l1"], "b": ["l2", "l3"]})
    pruned = prune_and_check(Chain().eval(), recipe, X)
    assert pruned.l1.out_features == 4  # family a: half of its 8 units
    # family b: 8 of its 16 units, ranked together: the weak l2 group gives up to max_sparsity (7), l3 the rest
    assert (pruned.l2.out_features, pruned.l3.out_features) == (1, 7)
    local = prune_and_check(Chain().eval(), channel_recipe(0.5, criterion="l1"), X)
    assert (local.l2.out_features, local.l3.out_features) == (4, 4)


def test_groups_in_no_family_are_left_alone() -> None:
    # only l3|l4 names a family member (its reader l4): l1|l2 and l2|l3 keep every channel
    recipe = channel_recipe(0.5, criterion="l1", scope="module", modules={"b": ["l4"]})
    pruned = prune_and_check(Chain().eval(), recipe, X)
    assert (pruned.l1.out_features, pruned.l2.out_features, pruned.l3.out_features) == (8, 8, 4)


def test_family_of_a_group_is_its_producer_first() -> None:
    # l2|l3 is read by l3 (family x, listed first) but produced by l2 (family y): the producer wins, so x holds
    # only l3|l4 (4 of 8 removed) and y holds l1|l2 (via its reader l2) and l2|l3 (8 of 16 removed between them)
    recipe = channel_recipe(0.5, criterion="l1", scope="module", modules={"x": ["l3"], "y": ["l2"]})
    pruned = prune_and_check(Chain().eval(), recipe, X)
    assert pruned.l3.out_features == 4
    assert pruned.l1.out_features + pruned.l2.out_features == 8
    recipe = channel_recipe(0.5, criterion="l1", scope="module", modules={"x": ["l3"]})
    both = prune_and_check(Chain().eval(), recipe, X)
    assert (both.l1.out_features, both.l2.out_features, both.l3.out_features) == (8, 1, 7)  # reader fallback


def rescat() -> nn.Module:
    """The shared residual + concat toy at the sizes this file expects."""
    return ResCatNet(width=16, fuse=32, classes=10)


@pytest.mark.parametrize("kind,target", [("flops", 0.4), ("params", 0.3)])
def test_module_scope_meets_budgets_within_one_percent(kind: str, target: float) -> None:
    x = torch.randn(2, 3, 10, 10)
    model = rescat().eval()
    recipe = channel_recipe(target, kind, criterion="dimap", scope="module",
                            modules={"trunk": ["stem.*", "body.*"], "branch": ["side", "fuse"]})
    pruned = prune_and_check(model, recipe, x)
    before, after = (count_model(_traced(m, x)) for m in (model, pruned))
    key = "macs" if kind == "flops" else "params"
    assert abs(1 - after[key] / before[key] - target) < 0.01


def _traced(m: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = fxprune.trace(m)
    fxprune.record_shapes(gm, (x,))
    return gm


def test_module_scope_recipe_validation() -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.modules.*at least one"):
        fxprune.Recipe.load(channel_recipe(0.5, scope="module"))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.modules"):
        fxprune.Recipe.load(channel_recipe(0.5, scope="module", modules={"mlp": "fc1"}))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.scope.*'module'"):
        fxprune.Recipe.load(channel_recipe(0.5, scope="modules"))
    r = fxprune.Recipe.load(channel_recipe(0.5, scope="module", modules={"mlp": ["*.fc1", "*.fc2"]}))
    assert fxprune.Recipe.from_dict(r.to_dict()).stages[0].modules == {"mlp": ["*.fc1", "*.fc2"]}
