"""Hugging Face's ``Conv1D`` (a linear layer with its weight stored ``(in, out)``): an MLP of two of them shrinks
in both axes, masked == shrunk, and the shrunk layers' ``nf`` / weight shapes agree."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D

from fxprune.testing import channel_recipe, prune_and_check


class Conv1DMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj, self.head = Conv1D(64, 16), Conv1D(16, 64), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.proj(nn.functional.gelu(self.fc(x))))


def test_conv1d_shrinks_both_axes_and_masked_equals_shrunk() -> None:
    torch.manual_seed(0)
    model = Conv1DMLP().eval()
    pruned = prune_and_check(model, channel_recipe(0.4, "flops"), torch.randn(2, 5, 16))
    fc, proj = pruned.get_submodule("fc"), pruned.get_submodule("proj")
    assert fc.nf < 64 and fc.weight.shape == (16, fc.nf) and fc.bias.shape == (fc.nf,)
    assert proj.weight.shape == (fc.nf, 16) and proj.nf == 16
