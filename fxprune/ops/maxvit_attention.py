"""``PrunedRelPosAttention``: torchvision MaxViT's relative-position attention after some heads were removed.

torchvision's ``RelativePositionalMultiHeadAttention.forward`` merges the heads back with the *input's* channel
count (``reshape(B, G, P, D)`` where ``D = x.shape[-1]``), which only holds while ``heads * head_dim`` equals it.
This subclass merges ``n_heads * head_dim`` features instead, so heads, input features and output features can
each be fewer. The computation is otherwise the same (the softmax scale stays the original one).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
except ImportError:  # torchvision is optional
    RelativePositionalMultiHeadAttention = None  # type: ignore[assignment,misc]

_Base: Any = RelativePositionalMultiHeadAttention if RelativePositionalMultiHeadAttention is not None else nn.Module


def qkv_rows(heads: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of ``to_qkv`` owned by ``heads``, as ``[len(heads), 3 * head_dim]`` (q, k and v features)."""
    part = torch.arange(3, device=heads.device).reshape(1, 3, 1) * n_heads * head_dim
    return (part + heads.reshape(-1, 1, 1) * head_dim + torch.arange(head_dim, device=heads.device)).reshape(len(heads), -1)


def merge_cols(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Columns of ``merge`` reading ``heads``, as ``[len(heads), head_dim]``."""
    return heads.reshape(-1, 1) * head_dim + torch.arange(head_dim, device=heads.device)


class PrunedRelPosAttention(_Base):
    """MaxViT attention whose merged width is ``n_heads * head_dim`` (see the module docstring)."""

    @classmethod
    def select(cls, m: nn.Module, heads: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor) -> "PrunedRelPosAttention":
        """A new module keeping ``heads``, input features ``inputs`` and output features ``outputs`` of ``m``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_heads, new.head_dim = len(heads), m.head_dim
        new.size, new.max_seq_len, new.scale_factor = m.size, m.max_seq_len, m.scale_factor
        rows = qkv_rows(heads, m.n_heads, m.head_dim).reshape(len(heads), 3, -1).transpose(0, 1).reshape(-1)  # q | k | v
        cols = merge_cols(heads, m.head_dim).reshape(-1)
        new.to_qkv = _linear(m.to_qkv, rows, inputs)
        new.merge = _linear(m.merge, outputs, cols)
        table = m.relative_position_bias_table
        new.relative_position_bias_table = nn.Parameter(table.detach()[:, heads].clone(), requires_grad=table.requires_grad)
        new.register_buffer("relative_position_index", m.relative_position_index.clone())
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        k = k * self.scale_factor
        scores = torch.einsum("bghid,bghjd->bghij", q, k) + self.get_relative_positional_bias()
        out = torch.einsum("bghij,bghjd->bghid", F.softmax(scores, dim=-1), v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, h * dh))


def _linear(src: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> nn.Linear:
    """A copy of ``src`` keeping output features ``rows`` and input features ``cols``."""
    w = src.weight.detach()[rows][:, cols].clone()
    out = nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=src.weight.requires_grad)
    if src.bias is not None:
        out.bias = nn.Parameter(src.bias.detach()[rows].clone(), requires_grad=src.bias.requires_grad)
    return out


__all__ = ["PrunedRelPosAttention", "qkv_rows", "merge_cols"]
