"""Tests of the gathered-patch attention kernel (``fxprune.kernels.gathered_attention``).

On CPU the Triton kernel runs under the Triton interpreter, enabled by
``tests/kernels/conftest.py`` (``TRITON_INTERPRET=1``) before the kernel module
is imported.  GPU tests (``-m gpu``) need CUDA; run them with
``TRITON_INTERPRET=0`` to exercise the compiled, autotuned kernel.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn

from fxprune.kernels import gathered_attention as ga
from fxprune.kernels.gathered_attention import gathered_attention, gathered_attention_reference
from fxprune.testing import assert_compiles

HAS_CUDA = torch.cuda.is_available()
# CPU kernel tests need the interpreter; a GPU run may opt out with TRITON_INTERPRET=0.
needs_interpreter = pytest.mark.skipif(
    not ga._interpreting() and os.environ.get("TRITON_INTERPRET", "").lower() in ("0", "false", "off"),
    reason="TRITON_INTERPRET=0: CPU kernel tests need the Triton interpreter",
)

# (dtype, atol, rtol) of kernel output vs an fp32 reference computed from the
# *same* (already rounded) inputs, so only the kernel's own rounding counts:
# - fp32: fp32 accumulation everywhere; only summation order differs -> ~1e-6.
# - fp16: P is rounded to fp16 before the PV product and the output is stored
#   in fp16 (unit roundoff 2**-11 ~ 4.9e-4) -> a few 1e-4 on O(1) values.
# - bf16: 8-bit mantissa (unit roundoff 2**-8 ~ 3.9e-3) -> ~1e-2.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def _make_idx(batch: int, n_tokens: int, k_tokens: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Per-batch different, unsorted indices; class token 0 always kept (PaPr)."""
    rows = []
    for _ in range(batch):
        patches = torch.randperm(n_tokens - 1, generator=gen)[: k_tokens - 1] + 1
        row = torch.cat([torch.zeros(1, dtype=torch.long), patches])
        rows.append(row[torch.randperm(k_tokens, generator=gen)])
    return torch.stack(rows).to(dtype)


def _make_inputs(batch=2, n_tokens=50, heads=2, head_dim=16, k_tokens=13, dtype=torch.float32,
                 idx_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, n_tokens, 3, heads, head_dim, generator=gen).to(dtype)
    return qkv, _make_idx(batch, n_tokens, k_tokens, idx_dtype, gen)


def _oracle(qkv: torch.Tensor, idx: torch.Tensor, scale=None) -> torch.Tensor:
    """fp32 reference on the same inputs (upcast after rounding)."""
    return gathered_attention_reference(qkv.float(), idx, scale)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- #
# Reference (the oracle itself)
# --------------------------------------------------------------------------- #
def test_reference_matches_naive_softmax():
    qkv, idx = _make_inputs(dtype=torch.float64)
    out = gathered_attention_reference(qkv, idx, scale=0.3)
    for b in range(qkv.shape[0]):
        sel = qkv[b, idx[b]]  # [K, 3, H, D]
        q, k, v = sel[:, 0], sel[:, 1], sel[:, 2]
        attn = torch.softmax(torch.einsum("khd,jhd->hkj", q, k) * 0.3, dim=-1)
        naive = torch.einsum("hkj,jhd->khd", attn, v)
        torch.testing.assert_close(out[b], naive)


def test_auto_backend_on_cpu_is_reference():
    qkv, idx = _make_inputs()
    out = gathered_attention(qkv, idx)
    assert out.shape == (2, 13, 2, 16) and out.is_contiguous()
    torch.testing.assert_close(out, gathered_attention_reference(qkv, idx), atol=0, rtol=0)


# --------------------------------------------------------------------------- #
# Triton kernel under the interpreter
# --------------------------------------------------------------------------- #
@needs_interpreter
def test_interpreter_is_active():
    assert ga._interpreting(), "conftest.py must set TRITON_INTERPRET=1 before the kernel is created"


@needs_interpreter
def test_triton_backend_launches_the_kernel(monkeypatch):
    launches = []
    real = ga._gathered_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(ga, "_gathered_attention_kernel", Spy())
    qkv, idx = _make_inputs(k_tokens=37)
    out = gathered_attention(qkv, idx, backend="triton")
    # K=37 with the 16-row interpreter tile -> 3 query tiles, B*H = 4 programs each.
    assert launches == [(3, 4)]
    _assert_close(out, _oracle(qkv, idx), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("k_tokens", [13, 37])
def test_triton_matches_reference(dtype, head_dim, k_tokens):
    qkv, idx = _make_inputs(head_dim=head_dim, k_tokens=k_tokens, dtype=dtype, seed=head_dim + k_tokens)
    out = gathered_attention(qkv, idx, backend="triton")
    assert out.shape == (2, k_tokens, 2, head_dim)
    _assert_close(out, _oracle(qkv, idx), dtype)


@needs_interpreter
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_triton_index_dtypes_and_custom_scale(idx_dtype):
    qkv, idx = _make_inputs(idx_dtype=idx_dtype, seed=3)
    out = gathered_attention(qkv, idx, scale=0.05, backend="triton")
    _assert_close(out, _oracle(qkv, idx, scale=0.05), torch.float32)


@needs_interpreter
def test_triton_strided_inputs():
    gen = torch.Generator().manual_seed(7)
    # qkv as a slice of a bigger buffer: every stride differs from the contiguous one.
    big = torch.randn(3, 60, 4, 3, 40, generator=gen)
    qkv = big[1:, 5:50, 1:, 1:, 3:35]  # [2, 45, 3, 2, 32]
    assert not qkv.is_contiguous()
    # idx with a non-unit inner stride.
    idx = _make_idx(2, 45, 26, torch.int64, gen)[:, ::2]
    assert not idx.is_contiguous() and idx.shape == (2, 13)
    out = gathered_attention(qkv, idx, backend="triton")
    _assert_close(out, _oracle(qkv, idx), torch.float32)


@needs_interpreter
def test_triton_permuted_layout_fp16():
    # A [B, 3, H, N, D] buffer viewed as [B, N, 3, H, D]: the token stride is D.
    qkv_c, idx = _make_inputs(n_tokens=40, k_tokens=21, dtype=torch.float16, seed=11)
    qkv = qkv_c.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    assert qkv.stride(1) == qkv.shape[-1]
    out = gathered_attention(qkv, idx, backend="triton")
    _assert_close(out, _oracle(qkv, idx), torch.float16)


@needs_interpreter
def test_triton_non_power_of_two_head_dim_and_duplicates():
    qkv, idx = _make_inputs(head_dim=24, k_tokens=13, seed=5)
    idx[1, 3:6] = idx[1, 7]  # repeated tokens are attended to once per repetition
    out = gathered_attention(qkv, idx, backend="triton")
    _assert_close(out, _oracle(qkv, idx), torch.float32)


@needs_interpreter
def test_triton_forced_asymmetric_tile():
    qkv, idx = _make_inputs(k_tokens=45, seed=9)
    out = ga._launch_triton(qkv, idx, None, block=(32, 16))
    _assert_close(out, _oracle(qkv, idx), torch.float32)


@needs_interpreter
def test_triton_bf16_in_interpreter():
    # The interpreter upcasts bf16 dot operands (its bf16 tl.dot is wrong).
    qkv, idx = _make_inputs(dtype=torch.bfloat16, seed=13)
    out = gathered_attention(qkv, idx, backend="triton")
    _assert_close(out, _oracle(qkv, idx), torch.bfloat16)


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "case, match",
    [
        ("qkv_rank", r"shape \[B, N, 3, H, D\]"),
        ("idx_rank", r"idx must have shape \[B, K\]"),
        ("batch", "batch size"),
        ("empty_k", "at least one token"),
        ("idx_float", "int32 or int64"),
        ("qkv_int", "dtype must be one of"),
        ("fp64_triton", "dtype must be one of"),
        ("range_hi", r"must lie in \[0, 50\)"),
        ("range_lo", r"must lie in \[0, 50\)"),
        ("head_dim", "head_dim <= 128"),
        ("backend", "backend must be one of"),
    ],
)
def test_validation_errors(case, match):
    qkv, idx = _make_inputs()
    kwargs = {}
    if case == "qkv_rank":
        qkv = qkv[:, :, 0]
    elif case == "idx_rank":
        idx = idx[0]
    elif case == "batch":
        idx = idx[:1]
    elif case == "empty_k":
        idx = idx[:, :0]
    elif case == "idx_float":
        idx = idx.float()
    elif case == "qkv_int":
        qkv = qkv.to(torch.int32)
    elif case == "fp64_triton":
        qkv, kwargs = qkv.double(), {"backend": "triton"}
    elif case == "range_hi":
        idx[1, 4] = 50
    elif case == "range_lo":
        idx[0, 2] = -1
    elif case == "head_dim":
        qkv, kwargs = torch.zeros(1, 4, 3, 1, 136), {"backend": "triton"}
        idx = torch.zeros(1, 2, dtype=torch.long)
    elif case == "backend":
        kwargs = {"backend": "cuda"}
    with pytest.raises(ValueError, match=match):
        gathered_attention(qkv, idx, **kwargs)


# --------------------------------------------------------------------------- #
# Custom op: opcheck, torch.compile, autograd
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cpu(requires_grad):
    qkv, idx = _make_inputs(n_tokens=10, k_tokens=6, head_dim=8)
    qkv.requires_grad_(requires_grad)
    for scale in (None, 0.5):
        torch.library.opcheck(torch.ops.fxprune.gathered_attention.default, (qkv, idx, scale))


class _TinyPrunedAttention(nn.Module):
    """ViT-style attention block whose tokens are pruned by an index tensor."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, n_tokens, 3, self.heads, dim // self.heads)
        out = gathered_attention(qkv, idx)
        return self.proj(out.reshape(batch, idx.shape[1], dim))


def test_torch_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(17)
    model = _TinyPrunedAttention().eval()
    x = torch.randn(2, 30, 32, generator=gen)
    idx = _make_idx(2, 30, 11, torch.int64, gen)
    assert_compiles(model, x, idx, backend="inductor")


def test_torch_compile_backward_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(19)
    model = _TinyPrunedAttention()
    x = torch.randn(2, 30, 32, generator=gen)
    idx = _make_idx(2, 30, 11, torch.int32, gen)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x, idx).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, idx).square().sum().backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)


def test_gradcheck_float64():
    qkv, idx = _make_inputs(n_tokens=10, k_tokens=6, head_dim=4, dtype=torch.float64, seed=23)
    qkv.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: gathered_attention(t, idx, 0.4), (qkv,), fast_mode=True)


def test_autograd_formula_matches_reference_backward():
    qkv, idx = _make_inputs(dtype=torch.float64, seed=29)
    idx[0, 5] = idx[0, 2]  # duplicates: gradients must accumulate
    grad_out = torch.randn(2, 13, 2, 16, dtype=torch.float64)
    leaf_op = qkv.clone().requires_grad_(True)
    leaf_ref = qkv.clone().requires_grad_(True)
    gathered_attention(leaf_op, idx).backward(grad_out)
    gathered_attention_reference(leaf_ref, idx).backward(grad_out)
    torch.testing.assert_close(leaf_op.grad, leaf_ref.grad)
    unselected = torch.ones(qkv.shape[:2], dtype=torch.bool)
    unselected[torch.arange(2)[:, None], idx] = False
    assert leaf_op.grad[unselected].abs().max() == 0  # pruned tokens get no gradient


# --------------------------------------------------------------------------- #
# GPU
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_tokens", [13, 137])
def test_cuda_kernel_matches_reference(dtype, k_tokens):
    qkv, idx = _make_inputs(batch=3, n_tokens=197, heads=12, head_dim=64, k_tokens=k_tokens, dtype=dtype)
    qkv, idx = qkv.cuda(), idx.cuda()
    out = gathered_attention(qkv, idx, backend="triton")
    _assert_close(out, _oracle(qkv, idx), dtype)
    out_op = gathered_attention(qkv, idx)  # custom op -> Triton on CUDA
    _assert_close(out_op, _oracle(qkv, idx), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_backward_bf16():
    qkv, idx = _make_inputs(batch=2, n_tokens=64, heads=4, head_dim=32, k_tokens=40, dtype=torch.bfloat16)
    leaf = qkv.cuda().requires_grad_(True)
    out = gathered_attention(leaf, idx.cuda())
    out.float().sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all()
    assert math.isfinite(float(leaf.grad.float().abs().sum()))
