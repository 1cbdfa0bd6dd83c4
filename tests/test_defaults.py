"""Arguments the example inputs leave out are traced at their defaults (timm Hiera's ``forward(x, mask=None)``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.defaults import unbound_defaults
from fxprune.testing import channel_recipe, prune_and_check


class OptionalMask(nn.Module):
    """``if mask is not None`` on a proxy would take the masked branch, which the example run cannot execute."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 2.0) -> torch.Tensor:
        if mask is not None:
            x = x * mask.unsqueeze(1)
        return self.c2(torch.relu(self.c1(x))) * scale


def test_unbound_defaults() -> None:
    m = OptionalMask()
    x = torch.randn(1, 3, 4, 4)
    assert unbound_defaults(m, x) == {"mask": None, "scale": 2.0}
    assert unbound_defaults(m, (x, torch.ones(1, 4, 4))) == {"scale": 2.0}
    assert unbound_defaults(m, {"x": x}) == {}  # keyword inputs: not bound here


def test_optional_mask_left_out_prunes() -> None:
    model = OptionalMask().eval()
    x = torch.randn(2, 3, 6, 6)
    pruned = prune_and_check(model, channel_recipe(0.5), x)
    assert pruned.c1.out_channels == 8
    with pytest.raises(AssertionError, match="specialized"):  # the bound default is checked on every call
        pruned(x, torch.ones(2, 6, 6))


def test_optional_mask_given_traces_the_masked_branch() -> None:
    model = OptionalMask().eval()
    x, mask = torch.randn(2, 3, 6, 6), (torch.rand(2, 6, 6) > 0.5).float()
    pruned = prune_and_check(model, channel_recipe(0.5), (x, mask))
    with torch.no_grad():
        assert not torch.equal(pruned(x, mask), pruned(x, torch.ones_like(mask)))
    assert fxprune.report(model, pruned, (x, mask)).macs[1] < fxprune.report(model, pruned, (x, mask)).macs[0]
