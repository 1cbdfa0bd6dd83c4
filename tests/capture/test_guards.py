"""Concrete-metadata tracing: Python decisions on shapes, dtypes and lengths follow the example run, are guarded,
and a call that breaks a guard raises ``GuardError`` naming the input, the source line and the remedy."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune.capture import GuardError, capture_info
from fxprune.testing import assert_compiles, channel_recipe, prune_and_check
from fxprune.trace import trace


class ShapeBranches(nn.Module):
    """Control flow on ``x.shape[1] != c``, ``x.dim()``, ``len(x)``, ``range(x.size(0))``, ``x.dtype`` and a
    cached shape (``self.shape != shape``, as Ultralytics' ``Detect``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.shape = None
        self.grid = torch.empty(0)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected RGB")
        if x.dim() == 4 and x.dtype == torch.float32:
            x = x * 1.0
        h = torch.relu(self.conv1(x))
        rows = [h[i:i + 1] for i in range(h.size(0))]  # one item per batch row
        h = torch.cat(rows, 0) if len(rows) > 1 else rows[0]
        h = torch.relu(self.conv2(h))
        if self.shape != h.shape:  # a cache computed once per shape
            self.grid = torch.arange(h.shape[-1], dtype=h.dtype, device=h.device)
            self.shape = h.shape
        return self.conv3(h) + self.grid


def test_control_flow_on_metadata_traces_and_prunes():
    model = ShapeBranches().eval()
    x = torch.randn(1, 3, 12, 12)
    pruned = prune_and_check(model, channel_recipe(0.5), (x,))
    assert pruned.conv1.out_channels < 16
    assert model.shape is None, "tracing must not leave the model's caches set"
    info = capture_info(pruned)
    assert info is not None and any("x.shape[1] != 3" in line for line in info.guards)


def test_other_size_raises_guard_error_with_line_and_remedy():
    model = ShapeBranches().eval()
    pruned = fxprune.compile(model, channel_recipe(0.5), example_inputs=torch.randn(1, 3, 12, 12))
    with pytest.raises(GuardError) as err:
        pruned(torch.randn(1, 3, 20, 20))
    msg = str(err.value)
    assert "'x'" in msg and "12" in msg and "20" in msg, msg
    assert "test_guards.py" in msg and "compile again with example_inputs" in msg, msg
    with pytest.raises(GuardError, match="dtype"):
        pruned(torch.randn(1, 3, 12, 12, dtype=torch.float64))


def test_guards_do_not_break_torch_compile_fullgraph():
    pruned = fxprune.compile(ShapeBranches().eval(), channel_recipe(0.5), example_inputs=torch.randn(1, 3, 12, 12))
    assert_compiles(pruned, torch.randn(1, 3, 12, 12))


def test_direct_input_check_pins_only_what_it_reads():
    class ChannelCheck(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x, **kwargs):
            if x.shape[1] != 3:
                raise ValueError("expected RGB")
            return self.conv(x)

    gm = trace(ChannelCheck(), example_inputs=(torch.randn(1, 3, 8, 8),))
    torch.testing.assert_close(gm(torch.zeros(2, 3, 16, 16)).shape, torch.Size([2, 8, 16, 16]))
    with pytest.raises(GuardError, match=r"shape\[1\] = 4"):
        gm(torch.zeros(1, 4, 8, 8))


def test_value_dependent_branch_is_not_resolved():
    class DataBranch(nn.Module):
        def forward(self, x, **kwargs):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(fxprune.errors.TraceFailure, match="DataBranch.forward"):
        trace(DataBranch(), example_inputs=(torch.randn(1, 3),))
