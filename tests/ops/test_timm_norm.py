"""timm's norm+act leaves (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``) get their norm's rule."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check

layers = pytest.importorskip("timm.layers")


class NormActNet(nn.Module):
    def __init__(self, norm: nn.Module, act_norm: nn.Module) -> None:
        super().__init__()
        self.c1, self.n1, self.c2 = nn.Conv2d(3, 8, 3), norm, nn.Conv2d(8, 8, 1)
        self.n2, self.c3 = act_norm, nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.n2(self.c2(self.n1(self.c1(x)))))


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    t.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("make", [
    lambda: (layers.BatchNormAct2d(8, act_layer=nn.SiLU), layers.BatchNormAct2d(8, act_layer=nn.ReLU)),
    lambda: (layers.GroupNormAct(8, num_groups=4, act_layer=nn.GELU), layers.FrozenBatchNormAct2d(8)),
])
def test_norm_act_leaf_shrinks_like_its_norm(make) -> None:
    model = _randomize(NormActNet(*make()))
    x = torch.randn(2, 3, 6, 6)
    recipe = {**channel_recipe(0.5), "leaf_modules": ["BatchNormAct2d", "GroupNormAct", "FrozenBatchNormAct2d"]}
    pruned = prune_and_check(model, recipe, x)
    assert {n.target for n in pruned.graph.nodes if n.op == "call_module"} >= {"n1", "n2"}  # kept whole as leaves
    assert pruned.c1.out_channels < 8 and pruned.c2.out_channels < 8


def test_layer_norm_act_2d_freezes_channels() -> None:
    model = _randomize(NormActNet(layers.BatchNormAct2d(8), layers.LayerNormAct2d(8)))
    a = analyze_model(model, torch.randn(2, 3, 6, 6))
    assert not frozen_of(a, "@c1:0:0").all()
    assert frozen_of(a, "@c2:0:0").all()
