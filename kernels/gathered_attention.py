"""Attention restricted to an index-selected subset of tokens (PaPr patch pruning).

PaPr (arXiv 2403.16020) keeps only the top-k patch tokens of a ViT, described
by an index tensor ``idx[B, K]`` into the ``N`` tokens (the class token, index
0, is always kept).  Instead of materialising ``qkv[:, idx]`` and calling SDPA,
the Triton kernel below reads the selected rows of q, k and v straight from
the packed ``qkv[B, N, 3, H, D]`` tensor (the reshaped output of a ViT's qkv
``Linear``) with index-driven pointer arithmetic, inside a FlashAttention-style
online-softmax loop.

Public API:

* :func:`gathered_attention` -- checked host wrapper (``backend="auto"`` goes
  through the ``fxprune::gathered_attention`` custom op, so it composes with
  ``torch.compile(fullgraph=True)`` and autograd).
* :func:`gathered_attention_reference` -- pure PyTorch oracle / CPU fallback.
* :func:`get_gathered_attention_configs` -- autotuning search space.

On CPU tensors the kernel itself can only run under the Triton interpreter:
set ``TRITON_INTERPRET=1`` *before* this module is imported and call
``gathered_attention(..., backend="triton")``.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, interpreted, tl, triton

log = logging.getLogger(__name__)

__all__ = ["gathered_attention", "gathered_attention_reference", "get_gathered_attention_configs"]

_LOG2E = 1.4426950408889634
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float64 is accepted by the PyTorch path only (used for gradient checks).
_REFERENCE_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_HEAD_DIM = 128
_MAX_GRID_Y = 65535
# Tile used when the kernel runs in the Triton interpreter: one small config,
# so that a tiny test problem launches only a handful of programs.
INTERPRETER_BLOCK = 16
_BACKENDS = ("auto", "triton", "reference")


# --------------------------------------------------------------------------- #
# Autotuning search space
# --------------------------------------------------------------------------- #
def _keep_config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> bool:
    """Static filter: drop tile/warp/stage combinations that are never competitive."""
    tile = block_m * block_n
    if block_n > block_m:  # few query rows per wide key tile: poor reuse of q
        return False
    if (num_warps == 8 and tile < 64 * 64) or (num_warps == 4 and tile > 64 * 64):
        return False  # idle warps on small tiles / register spills on big ones
    return num_stages < 4 or tile <= 64 * 32  # deep pipelines only for small tiles


def get_gathered_attention_configs() -> list[triton.Config]:
    """Return the ``triton.Config`` search space used by the autotuner."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
        if _keep_config(bm, bn, warps, stages)
    ]


def _prune_for_problem(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """Problem-dependent pruning: no tile much larger than the token count, and
    no 128x128 tile when a row is wide (fp32 with D >= 64, 16-bit with D = 128)."""
    args = {**named_args, **kwargs}
    limit = max(32, int(args.get("K_BUCKET", 128)))
    qkv = args.get("qkv_ptr")
    row_bytes = int(args.get("BLOCK_D", 64)) * (qkv.element_size() if hasattr(qkv, "element_size") else 2)
    kept = [
        c for c in configs
        if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= limit
        and not (row_bytes >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128)
    ]
    return kept or configs[:1]


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    @triton.jit
    def _gathered_attention_kernel(
        qkv_ptr, idx_ptr, out_ptr,
        stride_qb, stride_qn, stride_qs, stride_qh, stride_qd,
        stride_ib, stride_ik,
        stride_ob, stride_ok, stride_oh, stride_od,
        H, K_TOKENS, HEAD_DIM, K_BUCKET, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    ):
        # ---- prologue: locate this program's (batch, head, query tile) --------
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # int64 offsets: qkv may exceed 2**31 elements
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < K_TOKENS
        mask_d = offs_d < HEAD_DIM  # BLOCK_D is HEAD_DIM padded to a power of two
        idx_row = idx_ptr + b * stride_ib
        head_base = qkv_ptr + b * stride_qb + h * stride_qh
        k_base = head_base + stride_qs  # slot 1 of the "3" axis
        v_base = head_base + 2 * stride_qs  # slot 2
        # Gather the query rows: load the token indices, then address the rows.
        tok_m = tl.load(idx_row + offs_m * stride_ik, mask=mask_m, other=0).to(tl.int64)
        q_ptrs = head_base + tok_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if DOT_UPCAST:  # the Triton interpreter mis-computes tl.dot on bf16 operands
            q = q.to(tl.float32)
        # Online-softmax state, fp32; scores use exp2 with log2(e) folded in qk_scale.
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # ---- main loop: stream the selected key/value rows tile by tile --------
        for start_n in range(0, K_TOKENS, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < K_TOKENS
            tok_n = tl.load(idx_row + cols * stride_ik, mask=mask_n, other=0).to(tl.int64)
            row_off = tok_n[:, None] * stride_qn + offs_d[None, :] * stride_qd
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + row_off, mask=kv_mask, other=0.0)
            v = tl.load(v_base + row_off, mask=kv_mask, other=0.0)
            if DOT_UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))  # padding keys get no weight
            # Column 0 of the first tile is always valid (K >= 1), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated so far
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # ---- epilogue: normalise and store the valid rows/columns --------------
        acc = acc / l_i[:, None]
        out_ptrs = (out_ptr + b * stride_ob + h * stride_oh
                    + offs_m[:, None] * stride_ok + offs_d[None, :] * stride_od)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


    _gathered_attention_kernel_autotuned = triton.autotune(
        configs=get_gathered_attention_configs(),
        key=["K_BUCKET", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _prune_for_problem},
    )(_gathered_attention_kernel)


# Decided once, when ``@triton.jit`` ran (it reads TRITON_INTERPRET at that moment).
_INTERPRETED = HAS_TRITON and interpreted(_gathered_attention_kernel)


def _interpreting() -> bool:
    """True when the kernel was built by the Triton interpreter."""
    return _INTERPRETED


# --------------------------------------------------------------------------- #
# Checks
# --------------------------------------------------------------------------- #
def _check_inputs(qkv: torch.Tensor, idx: torch.Tensor, *, for_kernel: bool, check_values: bool) -> None:
    """Validate shapes, dtypes and devices; raise ``ValueError`` with a clear message."""
    if not isinstance(qkv, torch.Tensor) or not isinstance(idx, torch.Tensor):
        raise ValueError("gathered_attention: qkv and idx must both be torch.Tensor")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"gathered_attention: qkv must have shape [B, N, 3, H, D], got {tuple(qkv.shape)}")
    if idx.dim() != 2:
        raise ValueError(f"gathered_attention: idx must have shape [B, K], got {tuple(idx.shape)}")
    batch, n_tokens, _, heads, head_dim = qkv.shape
    if idx.shape[0] != batch:
        raise ValueError(f"gathered_attention: idx batch size {idx.shape[0]} != qkv batch size {batch}")
    if idx.shape[1] < 1:
        raise ValueError("gathered_attention: idx must select at least one token (K >= 1)")
    if idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"gathered_attention: idx must be int32 or int64, got {idx.dtype}")
    allowed = _KERNEL_DTYPES if for_kernel else _REFERENCE_DTYPES
    if qkv.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"gathered_attention: qkv dtype must be one of {names}, got {qkv.dtype}")
    if qkv.device != idx.device:
        raise ValueError(f"gathered_attention: qkv is on {qkv.device} but idx is on {idx.device}")
    if for_kernel:
        if not HAS_TRITON:
            raise ValueError("gathered_attention: backend='triton' requested but triton is not installed")
        if not 1 <= head_dim <= _MAX_HEAD_DIM:
            raise ValueError(f"gathered_attention: the Triton kernel supports head_dim <= {_MAX_HEAD_DIM}, "
                             f"got {head_dim}")
        if batch * heads > _MAX_GRID_Y:
            raise ValueError(f"gathered_attention: B*H = {batch * heads} exceeds the grid limit {_MAX_GRID_Y}")
        if qkv.device.type != "cuda" and not _interpreting():
            raise ValueError(
                "gathered_attention: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                f"before fxprune.kernels.gathered_attention is imported (got device {qkv.device})"
            )
    if check_values and idx.numel() > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n_tokens:
            raise ValueError(f"gathered_attention: idx values must lie in [0, {n_tokens}), got range [{lo}, {hi}]")


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------- #
# Reference and launcher
# --------------------------------------------------------------------------- #
def gathered_attention_reference(qkv: torch.Tensor, idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Pure PyTorch oracle: gather the selected rows, then ``scaled_dot_product_attention``.

    Args:
        qkv: ``[B, N, 3, H, D]`` packed queries/keys/values (any strides).
        idx: ``[B, K]`` int32/int64 token indices into ``N``.
        scale: softmax scale, ``1/sqrt(D)`` when ``None``.

    Returns:
        Contiguous ``[B, K, H, D]`` tensor.
    """
    batch = qkv.shape[0]
    rows = torch.arange(batch, device=qkv.device).unsqueeze(1)
    sel = qkv[rows, idx.long()]  # [B, K, 3, H, D]
    q, k, v = (sel[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, K, D] each
    out = F.scaled_dot_product_attention(q, k, v, scale=_resolve_scale(scale, qkv.shape[-1]))
    return out.transpose(1, 2).contiguous()


def _launch_triton(
    qkv: torch.Tensor, idx: torch.Tensor, scale: float | None, *, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """Allocate the output and launch the kernel (inputs assumed checked).

    ``block=(BLOCK_M, BLOCK_N)`` forces a single config; otherwise the
    autotuner picks one on GPU and ``INTERPRETER_BLOCK`` is used in the interpreter.
    """
    batch, _, _, heads, head_dim = qkv.shape
    k_tokens = idx.shape[1]
    out = torch.empty((batch, k_tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    qk_scale = _resolve_scale(scale, head_dim) * _LOG2E
    block_d = max(16, triton.next_power_of_2(head_dim))
    # bf16 dots are wrong in the Triton interpreter (triton 3.x): upcast there.
    upcast = _interpreting() and qkv.dtype == torch.bfloat16
    precision = "ieee" if qkv.dtype == torch.float32 or upcast else "tf32"  # ignored for 16-bit inputs
    args = (
        qkv, idx, out,
        *qkv.stride(), *idx.stride(), *out.stride(),
        heads, k_tokens, head_dim, triton.next_power_of_2(k_tokens), qk_scale,
    )
    if block is None and _interpreting():
        block = (INTERPRETER_BLOCK, INTERPRETER_BLOCK)
    if block is not None:
        grid = (triton.cdiv(k_tokens, block[0]), batch * heads)
        log.debug("gathered_attention: fixed config %s, grid %s", block, grid)
        _gathered_attention_kernel[grid](
            *args, BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_D=block_d, DOT_PRECISION=precision,
            DOT_UPCAST=upcast, num_warps=4, num_stages=2,
        )
    else:
        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(k_tokens, meta["BLOCK_M"]), batch * heads)

        _gathered_attention_kernel_autotuned[grid](
            *args, BLOCK_D=block_d, DOT_PRECISION=precision, DOT_UPCAST=upcast
        )
    return out


# --------------------------------------------------------------------------- #
# Custom ops (forward + backward) for torch.compile and autograd
# --------------------------------------------------------------------------- #
@torch.library.custom_op("fxprune::gathered_attention", mutates_args=())
def _gathered_attention_op(qkv: torch.Tensor, idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return gathered_attention_reference(qkv, idx, scale)  # CPU / default implementation


@_gathered_attention_op.register_kernel("cuda")
def _gathered_attention_cuda(qkv: torch.Tensor, idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    batch, _, _, heads, head_dim = qkv.shape
    if not HAS_TRITON or qkv.dtype not in _KERNEL_DTYPES or head_dim > _MAX_HEAD_DIM or batch * heads > _MAX_GRID_Y:
        log.debug("gathered_attention: %s %s outside the kernel's range (or no triton), using the reference",
                  qkv.dtype, tuple(qkv.shape))
        return gathered_attention_reference(qkv, idx, scale)
    return _launch_triton(qkv, idx, scale)


@_gathered_attention_op.register_fake
def _gathered_attention_fake(qkv: torch.Tensor, idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    batch, _, _, heads, head_dim = qkv.shape
    return qkv.new_empty((batch, idx.shape[1], heads, head_dim))


def _reference_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, idx: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Gradient of :func:`gathered_attention_reference` w.r.t. ``qkv``.

    Recomputes the attention probabilities of the gathered rows and applies
    the softmax-attention backward in plain PyTorch ops (fp32, or fp64 for
    fp64 inputs), then scatter-adds the row gradients back into ``qkv``'s
    layout.  Written out analytically because ``torch.autograd.grad`` cannot
    record inside a custom-op implementation (autograd keys are excluded
    there); plain ops also keep the formula traceable by ``torch.compile``.
    """
    batch = qkv.shape[0]
    calc = torch.promote_types(qkv.dtype, torch.float32)
    s = _resolve_scale(scale, qkv.shape[-1])
    idx_l = idx.long()
    rows = torch.arange(batch, device=qkv.device).unsqueeze(1).expand_as(idx_l)
    sel = qkv[rows, idx_l].to(calc)  # [B, K, 3, H, D]
    q, k, v = (sel[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, K, D]
    probs = torch.softmax(q @ k.transpose(-1, -2) * s, dim=-1)  # [B, H, K, K]
    d_out = grad_out.to(calc).transpose(1, 2)  # [B, H, K, D]
    out = probs @ v
    d_v = probs.transpose(-1, -2) @ d_out
    d_probs = d_out @ v.transpose(-1, -2)
    d_scores = probs * (d_probs - (d_out * out).sum(-1, keepdim=True))
    d_q = (d_scores @ k) * s
    d_k = (d_scores.transpose(-1, -2) @ q) * s
    d_sel = torch.stack([d_q, d_k, d_v], dim=2).permute(0, 3, 2, 1, 4)  # [B, K, 3, H, D]
    grad = torch.zeros(qkv.shape, dtype=calc, device=qkv.device)
    grad = grad.index_put((rows, idx_l), d_sel, accumulate=True)  # repeated indices add up
    return grad.to(qkv.dtype)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    qkv, idx, scale = inputs
    ctx.save_for_backward(qkv, idx)
    ctx.scale = scale


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
    qkv, idx = ctx.saved_tensors
    grad_qkv = None
    if ctx.needs_input_grad[0]:
        grad_qkv = _reference_backward(grad_out, qkv, idx, ctx.scale)
    return grad_qkv, None, None


_gathered_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- #
# Public host wrapper
# --------------------------------------------------------------------------- #
def gathered_attention(
    qkv: torch.Tensor,
    idx: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Attention among the tokens of ``qkv`` selected by ``idx``.

    Computes ``softmax(q_sel @ k_sel^T * scale) @ v_sel`` per batch element
    and head, where ``*_sel`` are the rows at ``idx[b]``.

    Args:
        qkv: ``[B, N, 3, H, D]`` packed q/k/v, fp16/bf16/fp32 (fp64 for the
            PyTorch path only); arbitrary strides.
        idx: ``[B, K]`` int32/int64 token indices into ``N`` (any order,
            different per batch element).
        scale: softmax scale, ``1/sqrt(D)`` when ``None``.
        backend: ``"auto"`` -- the ``fxprune::gathered_attention`` custom op
            (Triton on CUDA, reference elsewhere; differentiable, compilable);
            ``"triton"`` -- launch the kernel directly (CUDA, or CPU under
            ``TRITON_INTERPRET=1``; no autograd); ``"reference"`` -- PyTorch.
        check_indices: verify ``0 <= idx < N`` (one device sync; skipped
            automatically while ``torch.compile`` traces).

    Returns:
        ``[B, K, H, D]`` tensor of ``qkv``'s dtype.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"gathered_attention: backend must be one of {_BACKENDS}, got {backend!r}")
    check_values = check_indices and not torch.compiler.is_compiling()
    _check_inputs(qkv, idx, for_kernel=backend == "triton", check_values=check_values)
    if backend == "reference":
        return gathered_attention_reference(qkv, idx, scale)
    if backend == "triton":
        return _launch_triton(qkv, idx, scale)
    return torch.ops.fxprune.gathered_attention(qkv, idx, scale)
