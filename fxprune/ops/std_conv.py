"""Weight-standardized convolutions: timm's ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d`` and
``ScaledStdConv2dSame`` (BiT ResNet-V2, NF-ResNets, NFNets), kept whole as leaves, and fxprune's
``PinnedStdConv2d`` that replaces them once input channels are removed.

Each standardizes its weight per output filter (mean and variance over that filter's input channels and kernel
taps) before a plain convolution; the scaled variants then multiply each filter by ``gain * scale``, where
``scale`` is fixed from the fan-in. So:

- output channels shrink in place: removing a filter leaves every other filter's statistics as they were; the
  weight rows, the bias and the per-filter ``gain`` are sliced;
- input channels cannot shrink in place: removing one would change the mean and variance of every filter. When a
  plan removes some, the conv becomes ``fxprune.nn.PinnedStdConv2d``, which keeps the original statistics (the
  removed columns enter them as per-filter constants), so it computes what the original computes with those
  channels zeroed;
- with ``groups > 1`` a whole group (its input and output channels) is one unit, as for any grouped conv: the
  filters left keep all of their inputs, so nothing needs pinning.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import fx

from ..ir.context import RewriteContext, SizeContext
from ..nn.std_conv import PinnedStdConv2d
from .conv import ConvRule
from .registry import register_installed, register_op
from .tensor_attr import index_tensor, resolve, slice_attr

#: the timm class names this rule covers (those present in the installed timm are registered)
STD_CONV_NAMES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


class StdConvRule(ConvRule):
    """A plain conv's ties and sizes; shrinking also slices ``gain`` and pins the statistics of removed inputs."""

    name = "std_conv"

    def shrink_module(self, gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
        m = gm.get_submodule(path)
        assert isinstance(m, torch.nn.Conv2d), f"{path} is not a weight-standardized Conv2d"
        keep_out, keep_in = r.kept_param(path, 0), r.kept_param(path, 1)
        if m.groups > 1 or keep_in is None:  # whole groups or outputs only: the timm module stays
            super().shrink_module(gm, path, r)
        else:
            if not isinstance(m, PinnedStdConv2d):
                m = PinnedStdConv2d.from_timm(m)
                owner, name = resolve(gm, path)
                setattr(owner, name, m)
            m.remove_inputs(index_tensor(keep_in, m.weight.device))
            slice_attr(m, "weight", 0, keep_out)
            slice_attr(m, "bias", 0, keep_out)
            if keep_out is not None:
                m.out_channels = len(keep_out)
        for name in ("gain", "removed_sum", "removed_sq_sum"):
            slice_attr(m, name, 0, keep_out)

    def param_slices(self, gm: fx.GraphModule, path: str, axis: int, idx: np.ndarray) -> list[tuple[str, torch.Tensor]]:
        out = super().param_slices(gm, path, axis, idx)
        gain = getattr(gm.get_submodule(path), "gain", None)
        if axis == 0 and isinstance(gain, torch.Tensor):
            out.append(("scale", gain.detach()[index_tensor(idx, gain.device)].reshape(len(idx), -1)))
        return out

    def param_count(self, gm: fx.GraphModule, path: str, s: SizeContext) -> int:
        gain = getattr(gm.get_submodule(path), "gain", None)
        extra = s.axis(path, 0) * (gain.numel() // gain.shape[0]) if isinstance(gain, torch.Tensor) else 0
        return super().param_count(gm, path, s) + extra


register_op(PinnedStdConv2d)(StdConvRule)


def register() -> None:
    """Register the rule for the weight-standardized convs of the installed timm (once; only if timm is imported)."""
    register_installed("timm.layers", STD_CONV_NAMES, StdConvRule)
