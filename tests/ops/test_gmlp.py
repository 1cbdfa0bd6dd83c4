"""gMLP's spatial gating unit (timm ``SpatialGatingUnit``): the MLP hidden dims around the gate prune (``fc1``'s
``u`` half and ``fc2``'s columns), the gate half ``v`` and the tokens stay; masked == shrunk."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.nn import PrunedSpatialGatingUnit
from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check, units_of

mlp_mixer = pytest.importorskip("timm.models.mlp_mixer")

DIM, TOKENS, HIDDEN = 8, 6, 24  # SpatialGatingBlock: fc1 8 -> 24 = [u 12 | v 12], fc2 12 -> 8


class TinyGMLP(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(5, DIM)
        self.blocks = nn.Sequential(*[mlp_mixer.SpatialGatingBlock(DIM, TOKENS, mlp_ratio=HIDDEN / DIM)
                                      for _ in range(blocks)])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyGMLP()
    with torch.no_grad():  # timm's gate init (proj ~ 0, bias 1) would make the gate trivial
        for m in model.modules():
            if isinstance(m, mlp_mixer.SpatialGatingUnit):
                m.proj.weight.normal_(0, 0.5)
                m.norm.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_gating_unit_coupling() -> None:
    a = analyze_model(_model(), torch.randn(2, TOKENS, 5))
    fc1_out = units_of(a, "@blocks.0.mlp_channels.fc1:0:0")
    np.testing.assert_array_equal(fc1_out[:12], units_of(a, "@blocks.0.mlp_channels.fc2:0:1"))  # u_i -> fc2 col i
    np.testing.assert_array_equal(units_of(a, "@blocks.0.mlp_channels.gate:0:0"), fc1_out[:12])
    assert len(np.unique(fc1_out[:12])) == 12 and not frozen_of(a, "@blocks.0.mlp_channels.fc1:0:0")[:12].any()
    assert frozen_of(a, "@blocks.0.mlp_channels.fc1:0:0")[12:].all()  # v: normalized over all its channels


@pytest.mark.parametrize("steps", [1, 2])
def test_gmlp_masked_equals_shrunk(steps: int) -> None:
    model = _model()
    x = torch.randn(2, TOKENS, 5)
    pruned = prune_and_check(model, channel_recipe(0.5, steps=steps), x)
    mlp = pruned.get_submodule("blocks.0.mlp_channels")
    assert isinstance(mlp.gate, PrunedSpatialGatingUnit) and mlp.gate.u_dim == 6
    assert mlp.fc1.out_features == 6 + 12 and mlp.fc2.in_features == 6  # u halved, v whole
    assert mlp.gate.norm.normalized_shape == (12,)
    assert pruned(x).shape == model(x).shape


def test_pruned_gating_unit_equals_original_with_zeroed_channels() -> None:
    """Independent of the plan machinery: the pruned unit on the kept channels vs the original on zeroed ones."""
    sgu = _model().blocks[0].mlp_channels.gate
    x = torch.randn(2, TOKENS, 24)
    keep = torch.tensor([1, 4, 5, 9])
    zeroed = x.clone()
    zeroed[..., [i for i in range(12) if i not in keep.tolist()]] = 0
    pruned = PrunedSpatialGatingUnit(sgu.norm, sgu.proj, keep)
    with torch.no_grad():
        got = pruned(torch.cat([x[..., keep], x[..., 12:]], -1))
        torch.testing.assert_close(got, sgu(zeroed)[..., keep])
        assert not sgu(zeroed)[..., [0, 2]].any()


def test_pruned_gmlp_compiles_without_graph_breaks() -> None:
    from fxprune import compile as fx_compile
    from fxprune.testing import assert_compiles

    x = torch.randn(2, TOKENS, 5)
    assert_compiles(fx_compile(_model(), channel_recipe(0.5), example_inputs=x), x)
