"""``PrunedMultiheadAttention``: what ``nn.MultiheadAttention`` computes, with fewer heads or smaller head dims.

The head-pruning rule (``fxprune/ops/attention_mha.py``) swaps an ``nn.MultiheadAttention`` for this module. It
keeps the packed ``in_proj_weight`` layout (q rows, then k rows, then v rows, head-major) and an ``out_proj``
``Linear``, but its q/k head dim (``qk_dim``) and v head dim (``v_dim``) may differ from ``embed_dim //
num_heads``. The softmax scale stays the original ``1/sqrt(head_dim)``, so removing a head or a head dim equals
zeroing it in the original module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``qk_dim`` (queries/keys) and ``v_dim`` (values) features.

    Args:
        embed_dim: features of the query/key/value inputs (``in_dim``) and of the output (``out_dim``) when they
            are not given separately.
        num_heads: heads kept.
        qk_dim, v_dim: per-head features of queries/keys and of values.
        scale: softmax temperature (the original module's ``1/sqrt(embed_dim // num_heads)``).
        batch_first: inputs are ``(batch, seq, feature)`` when true, ``(seq, batch, feature)`` otherwise.
        dropout: attention dropout probability (training only).
        bias: whether the input projection has a bias.
        in_dim, out_dim: input / output features (default ``embed_dim``).
    """

    def __init__(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float, *,
                 batch_first: bool = False, dropout: float = 0.0, bias: bool = True, in_dim: int | None = None,
                 out_dim: int | None = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.in_dim = in_dim or embed_dim
        self.out_dim = out_dim or embed_dim
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale = scale
        self.batch_first = batch_first
        self.dropout = dropout
        rows = num_heads * (2 * qk_dim + v_dim)
        self.in_proj_weight = nn.Parameter(torch.empty(rows, self.in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(rows)) if bias else None
        self.out_proj = nn.Linear(num_heads * v_dim, self.out_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """An exact copy of a (packed, bias_k-free) ``nn.MultiheadAttention``."""
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise ValueError("only nn.MultiheadAttention with a packed in_proj_weight, no bias_k/bias_v and "
                             "add_zero_attn=False can be converted")
        head = m.embed_dim // m.num_heads
        new = cls(m.embed_dim, m.num_heads, head, head, 1.0 / math.sqrt(head), batch_first=m.batch_first,
                  dropout=m.dropout, bias=m.in_proj_bias is not None)
        with torch.no_grad():
            new.in_proj_weight.copy_(m.in_proj_weight)
            if m.in_proj_bias is not None:
                new.in_proj_bias.copy_(m.in_proj_bias)
            new.out_proj.weight.copy_(m.out_proj.weight)
            if m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias)
            else:
                new.out_proj.bias = None
        return new.to(m.in_proj_weight.device, m.in_proj_weight.dtype).train(m.training)

    def row_index(self, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Indices into ``in_proj_weight`` rows of the q, k and v features of ``heads`` x (``qk`` | ``v``)."""
        h = heads.reshape(-1, 1)
        q_rows = (h * self.qk_dim + qk.reshape(1, -1)).reshape(-1)
        k_rows = q_rows + self.num_heads * self.qk_dim
        v_rows = (2 * self.num_heads * self.qk_dim + h * self.v_dim + v.reshape(1, -1)).reshape(-1)
        return torch.cat([q_rows, k_rows, v_rows])

    def select(self, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, inputs: torch.Tensor,
               outputs: torch.Tensor) -> PrunedMultiheadAttention:
        """A new module keeping the given heads, q/k head features, v head features, input and output features."""
        dev = self.in_proj_weight.device
        heads, qk, v, inputs, outputs = (t.to(dev) for t in (heads, qk, v, inputs, outputs))
        new = PrunedMultiheadAttention(self.embed_dim, len(heads), len(qk), len(v), self.scale,
                                       batch_first=self.batch_first, dropout=self.dropout,
                                       bias=self.in_proj_bias is not None, in_dim=len(inputs), out_dim=len(outputs))
        rows = self.row_index(heads, qk, v)
        cols = (heads.reshape(-1, 1) * self.v_dim + v.reshape(1, -1)).reshape(-1)
        with torch.no_grad():
            new.in_proj_weight.copy_(self.in_proj_weight[rows][:, inputs])
            if self.in_proj_bias is not None:
                new.in_proj_bias.copy_(self.in_proj_bias[rows])
            new.out_proj.weight.copy_(self.out_proj.weight[outputs][:, cols])
            if self.out_proj.bias is not None:
                new.out_proj.bias.copy_(self.out_proj.bias[outputs])
            else:
                new.out_proj.bias = None
        return new.to(dev, self.in_proj_weight.dtype).train(self.training)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int,
              dtype: torch.dtype) -> torch.Tensor | None:
        """One additive float mask broadcasting onto ``(batch, heads, L, S)``, or ``None``."""
        mask = None
        for m, shape in ((attn_mask, None), (key_padding_mask, (batch, 1, 1, -1))):
            if m is None:
                continue
            if m.dim() == 3:
                raise ValueError("PrunedMultiheadAttention takes a 2-D attn_mask (L, S); a per-head 3-D mask no "
                                 "longer matches the pruned heads")
            m = m.reshape(shape) if shape is not None else m
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
                if m.dtype == torch.bool else m.to(dtype)
            mask = m if mask is None else mask + m
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same signature and results as ``nn.MultiheadAttention.forward`` (2-D ``attn_mask`` only)."""
        packed = query is key and key is value  # self-attention: one packed projection
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        h, dq = self.num_heads, self.num_heads * self.qk_dim
        w, bias = self.in_proj_weight, self.in_proj_bias
        if packed:
            q, k, v = F.linear(query, w, bias).split([dq, dq, h * self.v_dim], -1)
        else:
            parts = (slice(0, dq), slice(dq, 2 * dq), slice(2 * dq, None))
            q, k, v = (F.linear(t, w[p], None if bias is None else bias[p]) for t, p in zip((query, key, value), parts))
        q = q.reshape(b, n_q, h, self.qk_dim).transpose(1, 2)
        k = k.reshape(b, n_k, h, self.qk_dim).transpose(1, 2)
        v = v.reshape(b, n_k, h, self.v_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, b, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, p, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal and mask is None, scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n_q, h * self.v_dim))
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, "
                f"v_dim={self.v_dim}, scale={self.scale:.6g}, batch_first={self.batch_first}")


__all__ = ["PrunedMultiheadAttention"]
