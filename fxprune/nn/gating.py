"""``PrunedSpatialGatingUnit``: gMLP's spatial gating unit (timm ``SpatialGatingUnit``) with fewer gated channels.

The unit splits its input channels into halves ``u`` and ``v``, normalizes ``v`` over its channels, mixes ``v``
along the token dim with a Linear, and returns ``u * v``. Channel ``i`` of the output is ``u_i`` times ``v_i``.
Removing output channels removes the matching ``u`` channels; ``v`` keeps all its channels (its norm's statistics
span them) and only the gates of the kept channels are mixed and multiplied.
"""
from __future__ import annotations

import torch
from torch import nn


class PrunedSpatialGatingUnit(nn.Module):
    """``u * proj(norm(v)[..., gate_index])`` over tokens, where ``u`` is the first ``len(gate_index)`` channels.

    Args:
        norm: the norm over the ``v`` half (all of its channels).
        proj: the Linear over the token dim.
        gate_index: the ``v`` channel gating each kept ``u`` channel (the kept output channels, in order).
    """

    gate_index: torch.Tensor

    def __init__(self, norm: nn.Module, proj: nn.Module, gate_index: torch.Tensor) -> None:
        super().__init__()
        self.norm, self.proj = norm, proj
        self.register_buffer("gate_index", gate_index.to(torch.long))

    @property
    def u_dim(self) -> int:
        return int(self.gate_index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = x[..., : self.u_dim], x[..., self.u_dim:]
        v = self.norm(v).index_select(-1, self.gate_index)
        v = self.proj(v.transpose(-1, -2))
        return u * v.transpose(-1, -2)


__all__ = ["PrunedSpatialGatingUnit"]
