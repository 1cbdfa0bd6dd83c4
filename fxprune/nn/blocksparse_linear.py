"""``BlockSparseLinear``: a linear layer that stores only the kept weight blocks.

Built from a dense ``nn.Linear`` and a block mask (LPViT-style semi-structured
pruning); its forward calls ``torch.ops.fxprune.blocksparse_linear`` so it runs
the Triton block-sparse kernel on CUDA, a dense-equivalent PyTorch path on CPU,
compiles with ``torch.compile(fullgraph=True)`` and can be fine-tuned (the kept
blocks ``values`` are a parameter).

CPU inference: PyTorch has no CPU block-sparse product faster than a dense GEMM at
ViT sizes and moderate sparsity, so in eval mode, without gradients, a CPU forward
is ``F.linear`` with a cached dense weight materialised from the kept blocks (a
non-persistent buffer: never saved; the state dict holds the blocks only). The
cache is rebuilt by ``eval()``, ``load_state_dict``, ``.to()`` and ``refresh_dense_cache()``,
and, in eager mode, whenever ``values`` changed since it was built (its version
counter). Training mode or gradients on ``values`` always use the custom op, so
fine-tuning updates the blocks. Under ``torch.compile`` the version check is
skipped: call ``eval()`` or ``refresh_dense_cache()`` after changing ``values``.

ONNX export (``torch.onnx.export(..., dynamo=True)``) decomposes the layer into a MatMul on the dense weight
rebuilt from the blocks (``weight_from_blocks``); onnxruntime folds that weight to a constant.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxprune.kernels.blocksparse_matmul import bsr_to_dense, dense_to_bsr

__all__ = ["BlockSparseLinear"]

log = logging.getLogger(__name__)


class BlockSparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W[out_features, in_features]`` stored as BSR blocks.

    Tensors: ``values`` (parameter, ``[nnz_blocks, BN, BK]``), ``col_indices``
    (buffer, ``[nnz_blocks]``), ``row_ptr`` (buffer, ``[out_features // BN + 1]``)
    and an optional ``bias`` parameter.  Use :meth:`from_dense` to build one.
    """

    def __init__(self, in_features: int, out_features: int, block_shape: tuple[int, int],
                 nnz_blocks: int = 0, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        bn, bk = int(block_shape[0]), int(block_shape[1])
        if bn <= 0 or bk <= 0 or out_features % bn or in_features % bk:
            raise ValueError(f"block shape {(bn, bk)} does not tile weight shape {(out_features, in_features)}")
        n_rows, n_cols = out_features // bn, in_features // bk
        if not 0 <= nnz_blocks <= n_rows * n_cols:
            raise ValueError(f"nnz_blocks must be in [0, {n_rows * n_cols}], got {nnz_blocks}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_shape = (bn, bk)
        self.values = nn.Parameter(torch.zeros(nnz_blocks, bn, bk, device=device, dtype=dtype))
        self.register_buffer("col_indices", torch.zeros(nnz_blocks, dtype=torch.int64, device=device))
        self.register_buffer("row_ptr", torch.zeros(n_rows + 1, dtype=torch.int64, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # built by from_dense / load_state_dict / eval / .to (the block indices above are placeholders until then)
        self.register_buffer("dense_cache", torch.empty(0, 0, device=device, dtype=dtype), persistent=False)
        self._cache_version = -1

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_mask: torch.Tensor) -> BlockSparseLinear:
        """Keep the blocks of ``linear.weight`` where ``block_mask`` (bool ``[N // BN, K // BK]``) is True."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if block_mask.dtype != torch.bool or block_mask.dim() != 2:
            raise ValueError(f"block_mask must be a 2-D bool tensor, got {block_mask.dtype} {tuple(block_mask.shape)}")
        n, k = linear.out_features, linear.in_features
        n_rows, n_cols = block_mask.shape
        if n_rows == 0 or n_cols == 0 or n % n_rows or k % n_cols:
            raise ValueError(f"block_mask shape {(n_rows, n_cols)} does not tile weight shape {(n, k)}")
        block_shape = (n // n_rows, k // n_cols)
        weight = linear.weight.detach()
        values, col_indices, row_ptr = dense_to_bsr(weight, block_shape, block_mask.to(weight.device))
        module = cls(k, n, block_shape, nnz_blocks=values.shape[0], bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.values.copy_(values)
            module.col_indices.copy_(col_indices)
            module.row_ptr.copy_(row_ptr)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        module.refresh_dense_cache()
        log.debug("BlockSparseLinear.from_dense: kept %d/%d blocks of shape %s",
                  values.shape[0], n_rows * n_cols, block_shape)
        return module

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the weight's blocks that are stored."""
        total = (self.out_features // self.block_shape[0]) * (self.in_features // self.block_shape[1])
        return self.nnz_blocks / total if total else 0.0

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``[out_features, in_features]`` (zeros where pruned)."""
        return bsr_to_dense(self.values.detach(), self.col_indices, self.row_ptr,
                            (self.out_features, self.in_features))

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same outputs."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def refresh_dense_cache(self) -> None:
        """Rebuild the dense weight used by CPU inference from the current blocks (an empty tensor off the CPU,
        where the block kernel runs: no dense copy is held on a GPU)."""
        with torch.inference_mode(False), torch.no_grad():
            if self.values.device.type == "cpu" and int(self.row_ptr[-1]) != self.values.shape[0]:
                self.dense_cache = self.values.new_empty(0, 0)  # placeholder indices: not built from blocks yet
                self._cache_version = -1
                return
            if self.values.device.type == "cpu":
                dense = bsr_to_dense(self.values.detach(), self.col_indices, self.row_ptr,
                                     (self.out_features, self.in_features))
            else:
                dense = self.values.new_empty(0, 0)
            if self.dense_cache.shape == dense.shape and self.dense_cache.dtype == dense.dtype \
                    and self.dense_cache.device == dense.device and not self.dense_cache.is_inference():
                self.dense_cache.copy_(dense)
            else:
                self.dense_cache = dense
        self._cache_version = self.values._version

    def _apply(self, fn: Any, recurse: bool = True) -> BlockSparseLinear:
        super()._apply(fn, recurse)  # .to(device / dtype), .half(), ...: the cache follows the blocks
        self.refresh_dense_cache()
        return self

    def train(self, mode: bool = True) -> BlockSparseLinear:
        super().train(mode)
        if not mode:
            self.refresh_dense_cache()
        return self

    def weight_from_blocks(self) -> torch.Tensor:
        """The dense weight rebuilt from the kept blocks with plain tensor ops whose shapes never depend on the
        block indices' values (a compare-and-sum block-row lookup, then one ``index_put``), so that exporters that
        trace with fake tensors (``torch.onnx.export(dynamo=True)``) can follow it: it becomes ONNX ops, not a
        call to the custom op."""
        bn, bk = self.block_shape
        n_rows, n_cols = self.out_features // bn, self.in_features // bk
        nnz = self.values.shape[0]
        block = torch.arange(nnz, device=self.row_ptr.device)
        rows = (block.unsqueeze(1) >= self.row_ptr[1:].unsqueeze(0)).sum(1)  # block i lies in row #(ends <= i)
        slots = rows * n_cols + self.col_indices
        flat = self.values.new_zeros(n_rows * n_cols, bn * bk).index_put((slots,), self.values.reshape(nnz, bn * bk))
        return flat.reshape(n_rows, n_cols, bn, bk).permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = self.values
        if torch.onnx.is_in_onnx_export():  # ONNX has no block-sparse op: a MatMul on the rebuilt dense weight
            return F.linear(x, self.weight_from_blocks(), self.bias)
        # CPU, eval mode and no gradient wanted for the blocks: the cached dense weight is exact and fastest.
        if x.is_cpu and not self.training and not (torch.is_grad_enabled() and values.requires_grad):
            if not torch.compiler.is_compiling() and self._cache_version != values._version:
                self.refresh_dense_cache()
            return F.linear(x, self.dense_cache, self.bias)
        return torch.ops.fxprune.blocksparse_linear(
            x, self.values, self.col_indices, self.row_ptr, self.out_features, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_shape={self.block_shape}, nnz_blocks={self.nnz_blocks}, "
                f"density={self.density:.3f}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The number of stored blocks is data dependent: adopt the incoming one so a
        # state dict loads into a module built with any nnz_blocks.
        values = state_dict.get(prefix + "values")
        cols = state_dict.get(prefix + "col_indices")
        if isinstance(values, torch.Tensor) and values.dim() == 3 and tuple(values.shape[1:]) == self.block_shape:
            if values.shape[0] != self.values.shape[0]:
                self.values = nn.Parameter(self.values.new_empty(values.shape),
                                           requires_grad=self.values.requires_grad)
        if isinstance(cols, torch.Tensor) and cols.dim() == 1 and cols.shape != self.col_indices.shape:
            self.col_indices = self.col_indices.new_empty(cols.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.values.shape[0] == self.col_indices.shape[0]:  # else load_state_dict reports the mismatch
            self.refresh_dense_cache()
