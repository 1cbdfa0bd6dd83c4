"""``PrunedRelPosAttention``: torchvision MaxViT's relative-position attention after some heads were removed.

torchvision's ``RelativePositionalMultiHeadAttention.forward`` merges the heads back with the *input's* channel
count (``reshape(B, G, P, D)`` where ``D = x.shape[-1]``), which only holds while ``heads * head_dim`` equals it.
This subclass merges ``n_heads * v_dim`` features instead, and lets queries/keys (``qk_dim``) and values
(``v_dim``) be narrower than ``head_dim``, so heads, per-head features, input features and output features can each
be fewer. The computation is otherwise the same (the softmax scale stays the original one).
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


def layout(m: nn.Module) -> tuple[int, int, int]:
    """(heads, q/k features per head, v features per head) of torchvision's module or of ``PrunedRelPosAttention``."""
    return m.n_heads, getattr(m, "qk_dim", m.head_dim), getattr(m, "v_dim", m.head_dim)


def qkv_rows(m: nn.Module, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of ``to_qkv`` holding q, k and v features ``qk`` / ``v`` of ``heads``: three ``[len(heads), n]``."""
    h, dq, dv = layout(m)
    hh = heads.reshape(-1, 1)
    q = hh * dq + qk.reshape(1, -1)
    return q, q + h * dq, 2 * h * dq + hh * dv + v.reshape(1, -1)


def merge_cols(m: nn.Module, heads: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Columns of ``merge`` reading v features ``v`` of ``heads``, as ``[len(heads), len(v)]``."""
    return heads.reshape(-1, 1) * layout(m)[2] + v.reshape(1, -1)


class PrunedRelPosAttention(_Base):
    """MaxViT attention whose merged width is ``n_heads * head_dim`` (see the module docstring)."""

    @classmethod
    def select(cls, m: nn.Module, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, inputs: torch.Tensor,
               outputs: torch.Tensor) -> PrunedRelPosAttention:
        """A new module keeping ``heads``, per-head q/k features ``qk`` and v features ``v``, input features
        ``inputs`` and output features ``outputs`` of ``m``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_heads, new.head_dim, new.qk_dim, new.v_dim = len(heads), m.head_dim, len(qk), len(v)
        new.size, new.max_seq_len, new.scale_factor = m.size, m.max_seq_len, m.scale_factor
        rows = torch.cat([r.reshape(-1) for r in qkv_rows(m, heads, qk, v)])  # q | k | v, head-major inside each
        cols = merge_cols(m, heads, v).reshape(-1)
        new.to_qkv = _linear(m.to_qkv, rows, inputs)
        new.merge = _linear(m.merge, outputs, cols)
        table = m.relative_position_bias_table
        new.relative_position_bias_table = nn.Parameter(table.detach()[:, heads].clone(),
                                                        requires_grad=table.requires_grad)
        new.register_buffer("relative_position_index", m.relative_position_index.clone())
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        h, dq, dv = self.n_heads, self.qk_dim, self.v_dim
        q, k, v = self.to_qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q, k, v = (t.reshape(b, g, p, h, -1).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        k = k * self.scale_factor
        scores = torch.einsum("bghid,bghjd->bghij", q, k) + self.get_relative_positional_bias()
        out = torch.einsum("bghij,bghjd->bghid", F.softmax(scores, dim=-1), v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, h * dv))


def _linear(src: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> nn.Linear:
    """A copy of ``src`` keeping output features ``rows`` and input features ``cols``."""
    w = src.weight.detach()[rows][:, cols].clone()
    out = nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=src.weight.requires_grad)
    if src.bias is not None:
        out.bias = nn.Parameter(src.bias.detach()[rows].clone(), requires_grad=src.bias.requires_grad)
    return out


__all__ = ["PrunedRelPosAttention", "layout", "qkv_rows", "merge_cols"]
