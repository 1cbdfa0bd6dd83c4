"""Block-sparse (BSR) matmul ``Y = X @ W^T`` for LPViT-style block-pruned linear layers.

``W[N, K]`` is stored by block-rows, like torch's BSR layout:

* ``values[nnz_blocks, BN, BK]``: the kept blocks, row-major inside a block;
* ``col_indices[nnz_blocks]``: block-column (index into ``K // BK``) of each block;
* ``row_ptr[N // BN + 1]``: blocks of block-row ``r`` are ``row_ptr[r]:row_ptr[r + 1]``.

Within a block-row the column indices are strictly increasing (as produced by
:func:`dense_to_bsr` and torch's ``to_sparse_bsr``); this and the index ranges are
validated for CPU inputs, not for CUDA ones (it would cost a device sync).

Backends of :func:`blocksparse_matmul`:

* ``"triton"``: the Triton kernel below (CUDA tensors, or CPU tensors when the
  process was started with ``TRITON_INTERPRET=1``);
* ``"dense"``: scatter the blocks into a dense weight, then ``F.linear``;
* ``"gather"``: per block-row gather of the needed ``X`` columns, then one ``bmm``;
* ``"torch"``: ``"gather"`` in the narrow regime where it beats dense on CPU
  (very sparse, few tokens), ``"dense"`` otherwise;
* ``"auto"``: ``"triton"`` on CUDA, ``"torch"`` elsewhere.

torch's own CPU BSR matmul is deliberately not used: it is several times slower
than the dense product at ViT sizes.  The op ``torch.ops.fxprune.blocksparse_linear``
wraps ``"auto"`` with a fake (meta) kernel and an autograd formula so it can be
used under ``torch.compile(fullgraph=True)`` and fine-tuned.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, interpreted, tl, triton

__all__ = ["HAS_TRITON", "blocksparse_matmul", "blocksparse_matmul_reference", "bsr_to_dense", "dense_to_bsr",
           "get_blocksparse_matmul_configs", "triton_interpreter_active"]

log = logging.getLogger(__name__)

_BACKENDS = ("auto", "triton", "torch", "dense", "gather")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Rough shared-memory budget per program (bytes); configs above it are pruned.
_SMEM_BUDGET = 160 * 1024


def triton_interpreter_active() -> bool:
    """True when this kernel was built for the Triton interpreter, i.e. TRITON_INTERPRET=1 was set before triton
    was first imported."""
    return HAS_TRITON and interpreted(_blocksparse_matmul_kernel)


# --------------------------------------------------------------------------- #
# Triton kernel
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    def _keep_config(conf: triton.Config) -> bool:
        """Static filter: a 256-row fp32 accumulator needs 8 warps to avoid spilling."""
        return not (conf.kwargs["BLOCK_M"] == 256 and conf.num_warps == 4)

    def get_blocksparse_matmul_configs() -> list[triton.Config]:
        """Autotune space: BLOCK_M (token rows per program) x num_warps x num_stages."""
        configs = [
            triton.Config({"BLOCK_M": bm}, num_warps=nw, num_stages=ns)
            for bm in (64, 128, 256)
            for nw in (4, 8)
            for ns in (3, 4)
        ]
        return [c for c in configs if _keep_config(c)]

    def _prune_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        """The autotuner's per-shape pruning hook: ``_configs_for`` the launch's arguments."""
        return _configs_for(configs, {**named_args, **kwargs}, interpreter=triton_interpreter_active())

    def _configs_for(configs: list[triton.Config], args: dict[str, Any], *, interpreter: bool) -> list[triton.Config]:
        """One small config under the interpreter, else drop tiles much taller than M and tiles whose pipeline
        does not fit in SMEM."""
        if interpreter:
            return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)]
        m_bucket, bn, bk = args["M_BUCKET"], args["BN"], args["BK"]
        elem = args["x_ptr"].element_size()
        kept = [
            c for c in configs
            if c.kwargs["BLOCK_M"] <= max(64, m_bucket)
            and c.num_stages * (c.kwargs["BLOCK_M"] * bk + bn * bk) * elem <= _SMEM_BUDGET
        ]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]

    @triton.autotune(
        configs=get_blocksparse_matmul_configs(),
        key=["M_BUCKET", "N", "K", "BN", "BK"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.jit
    def _blocksparse_matmul_kernel(
        x_ptr, values_ptr, col_ptr, row_ptr_ptr, bias_ptr, y_ptr,
        M, N, K, M_BUCKET,
        stride_xm, stride_xk, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # ---- prologue: this program owns rows [pid_m*BLOCK_M, +BLOCK_M) of Y and
        # the BN output features of block-row pid_n of W.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        mask_m = offs_m < M  # ragged last M tile
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        # A (BN, BK) row-major block read as its transpose (BK, BN): (k, n) -> n*BK + k.
        w_offs = offs_k[:, None] + offs_n[None, :] * BK
        start = tl.load(row_ptr_ptr + pid_n)
        end = tl.load(row_ptr_ptr + pid_n + 1)
        w_ptrs = values_ptr + start.to(tl.int64) * (BN * BK) + w_offs
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)

        # ---- main loop: K is walked over the nonzero blocks of this block-row
        # only; an empty block-row runs zero iterations and leaves acc at 0.
        for b in range(start, end):
            kb = tl.load(col_ptr + b).to(tl.int64)
            x_tile = tl.load(x_rows + (kb * BK + offs_k)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
            w_tile = tl.load(w_ptrs)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
            w_ptrs += BN * BK

        # ---- epilogue: fp32 bias add, cast to the output dtype, masked store.
        offs_yn = pid_n * BN + offs_n
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_yn).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_yn[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])

    def _launch_kernel(kernel: Any, x2d: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                       row_ptr: torch.Tensor, bias: torch.Tensor | None, n_out: int, k_in: int) -> torch.Tensor:
        m = x2d.shape[0]
        bn, bk = values.shape[1], values.shape[2]
        y = torch.empty((m, n_out), device=x2d.device, dtype=x2d.dtype)
        if m == 0 or n_out == 0:
            return y
        precision = "tf32" if x2d.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(m, meta["BLOCK_M"]), n_out // bn)

        kernel[grid](
            x2d, values, col_indices, row_ptr, bias if bias is not None else values, y,
            m, n_out, k_in, max(16, triton.next_power_of_2(m)),
            x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, BN=bn, BK=bk, INPUT_PRECISION=precision,
        )
        return y

    def _kernel_for(device: torch.device) -> Any:
        """The autotuned kernel; CPU tensors need it to have been built by the interpreter."""
        if device.type == "cuda":
            return _blocksparse_matmul_kernel
        if not triton_interpreter_active():
            # triton decides at import time whether @triton.jit builds interpreter functions.
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                             "(and this module) are imported")
        return _blocksparse_matmul_kernel


# --------------------------------------------------------------------------- #
# Format helpers and PyTorch paths
# --------------------------------------------------------------------------- #
def _block_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Block-row index of each stored block (static output shape, traceable)."""
    ids = torch.arange(nnz, device=row_ptr.device, dtype=row_ptr.dtype)
    return torch.searchsorted(row_ptr[1:].contiguous(), ids, right=True)


def bsr_to_dense(values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """Scatter the stored blocks straight into a row-major dense ``[N, K]`` weight
    (one fill + one scatter; no ``[rows, cols, BN, BK]`` temporary and permute copy)."""
    n, k = shape
    bn, bk = values.shape[1], values.shape[2]
    rows = _block_rows(row_ptr, values.shape[0])
    weight = values.new_zeros(n, k)
    weight.view(n // bn, bn, k // bk, bk)[rows, :, col_indices, :] = values
    return weight


def dense_to_bsr(weight: torch.Tensor, block_shape: tuple[int, int],
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``weight[N, K]`` into ``(values, col_indices, row_ptr)``.

    Keeps the blocks selected by ``mask`` (bool ``[N // BN, K // BK]``), or every
    block holding a nonzero when no mask is given.  Indices are int64.
    """
    if weight.dim() != 2:
        raise ValueError(f"dense_to_bsr: weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    bn, bk = block_shape
    if bn <= 0 or bk <= 0 or n % bn or k % bk:
        raise ValueError(f"dense_to_bsr: block shape {block_shape} does not tile weight shape {(n, k)}")
    blocks = weight.reshape(n // bn, bn, k // bk, bk).permute(0, 2, 1, 3)
    if mask is None:
        mask = blocks.ne(0).any(dim=-1).any(dim=-1)
    elif tuple(mask.shape) != (n // bn, k // bk) or mask.dtype != torch.bool:
        raise ValueError(f"dense_to_bsr: mask must be bool of shape {(n // bn, k // bk)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.to(weight.device)
    idx = mask.nonzero()  # row-major order: sorted by block-row, then block-column
    values = blocks[idx[:, 0], idx[:, 1]].contiguous()
    row_ptr = torch.zeros(n // bn + 1, dtype=torch.int64, device=weight.device)
    row_ptr[1:] = mask.sum(dim=1).cumsum(0)
    return values, idx[:, 1].contiguous(), row_ptr


def blocksparse_matmul_reference(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                                 row_ptr: torch.Tensor, shape: tuple[int, int],
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Test oracle: densify with an explicit loop over block-rows, then ``F.linear``."""
    n, k = shape
    bn, bk = values.shape[1], values.shape[2]
    weight = values.new_zeros(n, k)
    ptr = row_ptr.tolist()
    cols = col_indices.tolist()
    for r in range(n // bn):
        for b in range(ptr[r], ptr[r + 1]):
            weight[r * bn:(r + 1) * bn, cols[b] * bk:(cols[b] + 1) * bk] += values[b]
    return F.linear(x, weight, bias)


def _dense_path(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                n_out: int, k_in: int, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, bsr_to_dense(values, col_indices, row_ptr, (n_out, k_in)), bias)


def _gather_path(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                 n_out: int, k_in: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Pad every block-row to the longest one, gather the X column blocks it needs
    and contract them with one batched matmul over block-rows."""
    nnz, bn, bk = values.shape
    n_rows, n_cols = n_out // bn, k_in // bk
    lead = x.shape[:-1]
    x3 = x.reshape(-1, n_cols, bk)
    m = x3.shape[0]
    width = int(row_ptr.diff().max()) if n_rows else 0
    rows = _block_rows(row_ptr, nnz)
    slot = torch.arange(nnz, device=x.device) - row_ptr[rows]
    cols = torch.zeros(n_rows, width, dtype=torch.long, device=x.device)
    cols[rows, slot] = col_indices.long()
    # Padding slots point at block-column 0 with all-zero weights.
    w = values.new_zeros(n_rows, width, bk, bn)
    w[rows, slot] = values.transpose(1, 2)
    xg = x3[:, cols.reshape(-1)].reshape(m, n_rows, width * bk)
    y = torch.einsum("mrk,rkn->mrn", xg, w.reshape(n_rows, width * bk, bn)).reshape(*lead, n_out)
    return y + bias if bias is not None else y


def _prefer_gather(m: int, row_ptr: torch.Tensor, n_cols: int) -> bool:
    """CPU heuristic measured on ViT-B shapes (32x32 blocks): the gather path only
    beats dense when the padded block density is <= ~20% and there are few tokens."""
    if m > 256 or row_ptr.numel() < 2 or n_cols == 0:
        return False
    return int(row_ptr.diff().max()) <= 0.2 * n_cols


def _check_inputs(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                  n_out: int, k_in: int, bias: torch.Tensor | None) -> None:
    if values.dim() != 3:
        raise ValueError(f"values must be [nnz_blocks, BN, BK], got shape {tuple(values.shape)}")
    nnz, bn, bk = values.shape
    if bn <= 0 or bk <= 0 or n_out % bn or k_in % bk:
        raise ValueError(f"block shape ({bn}, {bk}) does not divide weight shape ({n_out}, {k_in})")
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(f"x must have last dim k_in={k_in}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES or values.dtype != x.dtype:
        raise ValueError(f"x and values must share a floating dtype, got {x.dtype} and {values.dtype}")
    if col_indices.dim() != 1 or col_indices.numel() != nnz or col_indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"col_indices must be int32/int64 of shape [{nnz}], "
                         f"got {col_indices.dtype} {tuple(col_indices.shape)}")
    if row_ptr.dim() != 1 or row_ptr.numel() != n_out // bn + 1 or row_ptr.dtype not in _INDEX_DTYPES:
        raise ValueError(f"row_ptr must be int32/int64 of shape [{n_out // bn + 1}], "
                         f"got {row_ptr.dtype} {tuple(row_ptr.shape)}")
    if bias is not None and (tuple(bias.shape) != (n_out,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} of shape [{n_out}], got {bias.dtype} {tuple(bias.shape)}")
    tensors = [values, col_indices, row_ptr] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all inputs must be on x's device {x.device}, got {[str(t.device) for t in tensors]}")
    if x.device.type == "cpu" and nnz:  # cheap on CPU; on CUDA it would cost a sync
        if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr.diff() < 0).any()):
            raise ValueError(f"row_ptr must be non-decreasing from 0 to nnz_blocks={nnz}")
        if int(col_indices.min()) < 0 or int(col_indices.max()) >= k_in // bk:
            raise ValueError(f"col_indices must lie in [0, {k_in // bk})")
        same_row = _block_rows(row_ptr, nnz).diff() == 0
        if bool((same_row & (col_indices.diff() <= 0)).any()):
            raise ValueError("col_indices must be strictly increasing within each block-row (no duplicate blocks)")


def blocksparse_matmul(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                       n_out: int, k_in: int, bias: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """``x[..., K] @ W^T (+ bias)`` for a BSR weight ``W[n_out, k_in]``; returns ``[..., n_out]``.

    Checks the inputs (``ValueError`` on any mismatch), allocates the output and
    runs the chosen backend (see the module docstring).  ``x`` may have any
    leading dims and any strides.  Not autograd-aware on the Triton backend: use
    ``torch.ops.fxprune.blocksparse_linear`` for training.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(x, values, col_indices, row_ptr, n_out, k_in, bias)
    if values.shape[0] == 0:  # nothing stored: zeros (+ bias), no launch
        y = x.new_zeros((*x.shape[:-1], n_out))
        return y + bias if bias is not None else y
    if backend == "auto":
        backend = "triton" if x.device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "torch":
        m = x.numel() // max(k_in, 1)
        backend = "gather" if _prefer_gather(m, row_ptr, k_in // values.shape[2]) else "dense"
    log.debug("blocksparse_matmul: %s backend, x %s, W %s in %s blocks", backend, tuple(x.shape),
              (n_out, k_in), tuple(values.shape))
    if backend == "dense":
        return _dense_path(x, values, col_indices, row_ptr, n_out, k_in, bias)
    if backend == "gather":
        return _gather_path(x, values, col_indices, row_ptr, n_out, k_in, bias)
    # backend == "triton"
    if not HAS_TRITON:
        raise ValueError("backend='triton' requested but triton is not installed")
    bn, bk = values.shape[1], values.shape[2]
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton backend supports {_TRITON_DTYPES}, got {x.dtype}")
    if any(s < 16 or s & (s - 1) for s in (bn, bk)):
        raise ValueError(f"the Triton backend needs power-of-two block sizes >= 16, got ({bn}, {bk})")
    kernel = _kernel_for(x.device)
    x2d = x.reshape(-1, k_in)  # a view whenever possible: strides go to the kernel
    y = _launch_kernel(kernel, x2d, values.contiguous(), col_indices.contiguous(), row_ptr.contiguous(),
                       bias.contiguous() if bias is not None else None, n_out, k_in)
    return y.reshape(*x.shape[:-1], n_out)


# --------------------------------------------------------------------------- #
# torch.library registration: fxprune::blocksparse_linear
# --------------------------------------------------------------------------- #
@torch.library.custom_op("fxprune::blocksparse_linear", mutates_args=())
def blocksparse_linear(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                       n_out: int, k_in: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a BSR weight; Triton on CUDA, the PyTorch path elsewhere."""
    return blocksparse_matmul(x, values, col_indices, row_ptr, n_out, k_in, bias, backend="auto")


@blocksparse_linear.register_fake
def _(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
      n_out: int, k_in: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    torch._check(x.shape[-1] == k_in, lambda: f"x must have last dim k_in={k_in}")
    torch._check(values.dim() == 3, lambda: "values must be [nnz_blocks, BN, BK]")
    return x.new_empty((*x.shape[:-1], n_out))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, values, col_indices, row_ptr, n_out, k_in, bias = inputs
    ctx.save_for_backward(x, values, col_indices, row_ptr)
    ctx.shape = (n_out, k_in)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, values, col_indices, row_ptr = ctx.saved_tensors
    n_out, k_in = ctx.shape
    nnz, bn, bk = values.shape
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ bsr_to_dense(values, col_indices, row_ptr, (n_out, k_in))
    if ctx.needs_input_grad[1]:
        grad_w = grad_y.reshape(-1, n_out).t() @ x.reshape(-1, k_in)  # dense dL/dW, then keep stored blocks
        blocks = grad_w.reshape(n_out // bn, bn, k_in // bk, bk).permute(0, 2, 1, 3)
        grad_values = blocks[_block_rows(row_ptr, nnz), col_indices]
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad_y.reshape(-1, n_out).sum(0)
    return grad_x, grad_values, None, None, None, None, grad_bias


blocksparse_linear.register_autograd(_backward, setup_context=_setup_context)
