"""``PinnedStdConv2d``: a weight-standardized conv (timm ``StdConv2d`` / ``ScaledStdConv2d`` and their ``Same``
variants) some of whose input channels were removed.

Weight standardization normalizes each output filter by the mean and variance of *all* its weights. Removing input
channels would change those statistics for every filter, so the shrunk conv would not compute what the original
computes with the same channels zeroed. This module keeps the statistics of the original filters: the removed
columns enter them through two per-filter constants (the sum and the sum of squares of the removed weights, fixed
at pruning time) and the original fan-in, while only the kept columns are stored and convolved. At pruning time it
equals the original conv with the removed input channels zeroed; fine-tuning it trains the kept weights as the
original would with the removed ones held fixed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                 dilation: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` so a conv gives ``ceil(size / stride)`` outputs (TensorFlow's SAME)."""
    pads: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[-2:], kernel, stride, dilation))):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class PinnedStdConv2d(nn.Conv2d):
    """A 2-d weight-standardized conv whose filter statistics include removed input columns.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d`` (the
            sizes after pruning).
        fan_in: weights per filter in the original conv (its statistics are over this many values).
        scale: the filter multiplier besides ``gain`` (timm ``ScaledStdConv2d.scale``; 1 for ``StdConv2d``).
        eps: added to the variance.
        has_gain: whether filters are multiplied by a learned ``gain`` of shape ``(out_channels, 1, 1, 1)``.
        same_pad: pad the input at run time to TensorFlow SAME (``*Same`` variants with a dynamic padding).
    """

    removed_sum: torch.Tensor
    removed_sq_sum: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], *, fan_in: int,
                 stride: tuple[int, ...] = (1, 1), padding: tuple[int, ...] | str = (0, 0),
                 dilation: tuple[int, ...] = (1, 1), groups: int = 1, bias: bool = True, scale: float = 1.0,
                 eps: float = 1e-6, has_gain: bool = False, same_pad: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,  # type: ignore[arg-type]
                         padding=padding, dilation=dilation, groups=groups, bias=bias)  # type: ignore[arg-type]
        self.fan_in, self.scale, self.eps, self.same_pad = fan_in, scale, eps, same_pad
        self.gain: nn.Parameter | None = nn.Parameter(torch.ones(out_channels, 1, 1, 1)) if has_gain else None
        self.register_buffer("removed_sum", torch.zeros(out_channels))
        self.register_buffer("removed_sq_sum", torch.zeros(out_channels))

    @classmethod
    def from_timm(cls, m: nn.Conv2d) -> PinnedStdConv2d:
        """An exact copy of a timm ``StdConv2d``/``ScaledStdConv2d`` (or ``*Same``) with nothing removed yet."""
        gain = getattr(m, "gain", None)
        new = cls(m.in_channels, m.out_channels, m.kernel_size, fan_in=m.weight[0].numel(), stride=m.stride,
                  padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                  scale=float(getattr(m, "scale", 1.0)), eps=float(getattr(m, "eps", 1e-6)), has_gain=gain is not None,
                  same_pad=bool(getattr(m, "same_pad", False)))
        new.to(device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None and new.bias is not None:
                new.bias.copy_(m.bias)
            if gain is not None and new.gain is not None:
                new.gain.copy_(gain)
        new.train(m.training)
        return new

    def remove_inputs(self, keep: torch.Tensor) -> None:
        """Keep the input columns ``keep`` (indices into the per-group input axis, groups == 1); fold the others
        into the filter statistics."""
        w = self.weight.detach()
        gone = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        gone[keep] = False
        removed = w[:, gone].reshape(w.shape[0], -1)
        self.removed_sum += removed.sum(1)
        self.removed_sq_sum += removed.pow(2).sum(1)
        self.weight = nn.Parameter(w.index_select(1, keep).contiguous(), requires_grad=self.weight.requires_grad)
        self.in_channels = len(keep) * self.groups

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight.reshape(self.out_channels, -1)
        n_removed = self.fan_in - w.shape[1]
        mean = (w.sum(1) + self.removed_sum) / self.fan_in
        centred = w - mean[:, None]
        # sum over the removed r of (r - mean)^2 = sum r^2 - 2 mean sum r + n_removed mean^2
        var = (centred.pow(2).sum(1) + self.removed_sq_sum - 2 * mean * self.removed_sum
               + n_removed * mean * mean) / self.fan_in
        w = centred * torch.rsqrt(var + self.eps)[:, None]
        if self.gain is not None:
            w = w * (self.gain.reshape(-1, 1) * self.scale)
        elif self.scale != 1.0:
            w = w * self.scale
        return w.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = same_padding(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fan_in={self.fan_in}, gain={self.gain is not None}"


__all__ = ["PinnedStdConv2d", "same_padding"]
