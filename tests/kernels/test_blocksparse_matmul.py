"""Block-sparse matmul: Triton kernel (interpreter on CPU), PyTorch paths, format
helpers, input checks and the ``fxprune::blocksparse_linear`` op registration."""

import os
import subprocess
import sys

import pytest
import torch

from fxprune.kernels import blocksparse_matmul as bsm
from fxprune.kernels.blocksparse_matmul import (
    blocksparse_matmul,
    blocksparse_matmul_reference,
    bsr_to_dense,
    dense_to_bsr,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = bsm.triton_interpreter_active()
needs_triton = pytest.mark.skipif(
    not (bsm.HAS_TRITON and (DEVICE == "cuda" or INTERPRETED)),
    reason="needs CUDA, or TRITON_INTERPRET=1 before triton was imported (see test_interpreter_suite_in_subprocess)",
)

# (atol, rtol) against a float64 reference computed from the *same* low-precision
# inputs.  The kernel accumulates in fp32, so the error is fp32 summation order
# (K <= 128 terms of magnitude ~1: well below 1e-4) plus the final rounding of
# the output to its dtype: half an ulp, i.e. 2**-11 relative for fp16 and 2**-8
# for bf16; a different summation order can move that to one ulp, hence rtol =
# 2 ulp-ish (2e-3 fp16, 1.6e-2 bf16), and atol covers outputs close to zero.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),  # PyTorch paths only: same math as the reference
}


def make_problem(n, k, block, lead, dtype, *, bias=True, empty_row=None, density=0.5, seed=0, device=DEVICE):
    """Random x[*lead, k] and a BSR weight [n, k] with ~density of its blocks kept."""
    gen = torch.Generator().manual_seed(seed)
    bn, bk = block
    mask = torch.rand(n // bn, k // bk, generator=gen) < density
    mask[:, 0] |= ~mask.any(dim=1)  # every row non-empty unless asked otherwise
    if empty_row is not None:
        mask[empty_row] = False
    weight = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    values, cols, row_ptr = dense_to_bsr(weight, block, mask.to(device))
    x = torch.randn(*lead, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return x, values, cols, row_ptr, b


def check_against_reference(x, values, cols, row_ptr, n, k, b, y):
    ref = blocksparse_matmul_reference(x.double(), values.double(), cols, row_ptr, (n, k),
                                       b.double() if b is not None else None)
    atol, rtol = TOLERANCES[x.dtype]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n)
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- #
# Triton kernel
# --------------------------------------------------------------------------- #
@needs_triton
def test_kernel_runs_under_interpreter_on_cpu():
    if DEVICE == "cuda":
        pytest.skip("a GPU is present: the compiled kernel is tested instead")
    assert not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
    x, v, c, r, b = make_problem(64, 64, (32, 32), (5,), torch.float32)
    y = blocksparse_matmul(x, v, c, r, 64, 64, b, backend="triton")
    check_against_reference(x, v, c, r, 64, 64, b, y)
    # The autotuner really launched, with the single interpreter config.
    best = bsm._blocksparse_matmul_kernel.best_config
    assert best.kwargs["BLOCK_M"] == 64 and best.num_stages == 1


@pytest.mark.skipif(INTERPRETED or DEVICE == "cuda", reason="the interpreter tests already run in-process")
def test_interpreter_suite_in_subprocess():
    """Fallback when triton was imported before conftest could set TRITON_INTERPRET."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-k", "kernel_", "-p", "no:cacheprovider"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (32, 64), (64, 32)])
def test_kernel_matches_reference(block, dtype):
    # Ragged M (37 rows: one partial 64-row tile) and an empty block-row (bias only).
    n, k = 128, 128
    x, v, c, r, b = make_problem(n, k, block, (37,), dtype, empty_row=1)
    y = blocksparse_matmul(x, v, c, r, n, k, b, backend="triton")
    check_against_reference(x, v, c, r, n, k, b, y)
    bn = block[0]
    torch.testing.assert_close(y[:, bn:2 * bn], b[bn:2 * bn].expand(37, bn))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_no_bias_empty_row_is_zero(dtype):
    x, v, c, r, _ = make_problem(64, 128, (16, 32), (64,), dtype, bias=False, empty_row=0)
    y = blocksparse_matmul(x, v, c, r, 64, 128, None, backend="triton")
    check_against_reference(x, v, c, r, 64, 128, None, y)
    assert torch.count_nonzero(y[:, :16]) == 0


@needs_triton
@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_kernel_noncontiguous_x(view):
    n, k = 64, 64
    _, v, c, r, b = make_problem(n, k, (32, 32), (1,), torch.float32, seed=3)
    base = torch.randn(k, 40, device=DEVICE) if view == "transposed" else torch.randn(80, 2 * k, device=DEVICE)
    x = base.t() if view == "transposed" else base[::2, 1::2]  # strides (1, 40) / (256, 2)
    assert not x.is_contiguous() and x.shape == (40, k)
    y = blocksparse_matmul(x, v, c, r, n, k, b, backend="triton")
    check_against_reference(x, v, c, r, n, k, b, y)


@needs_triton
def test_kernel_3d_input_and_int32_indices():
    n, k = 64, 128
    x, v, c, r, b = make_problem(n, k, (32, 32), (2, 19), torch.float16)
    y = blocksparse_matmul(x, v, c.int(), r.int(), n, k, b, backend="triton")
    assert y.shape == (2, 19, n)
    check_against_reference(x, v, c, r, n, k, b, y)


@needs_triton
def test_kernel_single_row_and_empty_inputs():
    x, v, c, r, b = make_problem(64, 64, (16, 16), (1,), torch.float32)
    check_against_reference(x, v, c, r, 64, 64, b, blocksparse_matmul(x, v, c, r, 64, 64, b, backend="triton"))
    assert blocksparse_matmul(x[:0], v, c, r, 64, 64, b, backend="triton").shape == (0, 64)
    # No stored block at all: the output is the bias, broadcast.
    empty = torch.zeros(64, 64, device=DEVICE)
    v0, c0, r0 = dense_to_bsr(empty, (16, 16))
    y = blocksparse_matmul(x, v0, c0, r0, 64, 64, b, backend="triton")
    torch.testing.assert_close(y, b.expand(1, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton path needs CUDA")
@pytest.mark.parametrize("block", [(32, 32), (64, 32), (16, 64)])
def test_kernel_bf16_cuda(block):
    n, k = 768, 3072
    x, v, c, r, b = make_problem(n, k, block, (3, 197), torch.bfloat16, density=0.25, device="cuda")
    y = blocksparse_matmul(x, v, c, r, n, k, b)  # auto -> triton on CUDA
    ref = blocksparse_matmul_reference(x.float(), v.float(), c, r, (n, k), b.float())
    # K=3072 fp32 accumulation then one bf16 rounding of outputs of size ~sqrt(768).
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=1.6e-2)


def test_autotune_configs_and_pruning():
    if not bsm.HAS_TRITON:
        pytest.skip("triton not installed")
    configs = bsm.get_blocksparse_matmul_configs()
    assert {c.kwargs["BLOCK_M"] for c in configs} == {64, 128, 256}
    assert {c.num_warps for c in configs} == {4, 8} and {c.num_stages for c in configs} == {3, 4}
    assert not any(c.kwargs["BLOCK_M"] == 256 and c.num_warps == 4 for c in configs)  # keep filter
    assert bsm._blocksparse_matmul_kernel.keys == ["M_BUCKET", "N", "K", "BN", "BK"]
    x16 = torch.empty(1, dtype=torch.float16)
    args = {"M_BUCKET": 4096, "x_ptr": x16, "BN": 32, "BK": 32}
    assert len(bsm._configs_for(configs, args, interpreter=True)) == 1
    # the autotuner's hook asks the kernel itself whether it runs in the interpreter (see conftest.py)
    hooked = bsm._prune_configs(configs, {"M_BUCKET": 4096, "x_ptr": x16}, BN=32, BK=32)
    expected = bsm._configs_for(configs, args, interpreter=INTERPRETED)
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in hooked] == \
        [(c.kwargs, c.num_warps, c.num_stages) for c in expected]
    small = bsm._configs_for(configs, {"M_BUCKET": 32, "x_ptr": x16, "BN": 32, "BK": 32}, interpreter=False)
    assert small and {c.kwargs["BLOCK_M"] for c in small} == {64}
    # SMEM per program = stages * (BLOCK_M*BK + BN*BK) * itemsize, budget 160 KiB.
    large32 = bsm._configs_for(configs, {"M_BUCKET": 4096, "x_ptr": torch.empty(1), "BN": 64, "BK": 64},
                               interpreter=False)
    assert {c.kwargs["BLOCK_M"] for c in large32} == {64, 128}  # 256 rows of fp32: >= 240 KiB
    large16 = bsm._configs_for(configs, {"M_BUCKET": 4096, "x_ptr": x16, "BN": 64, "BK": 64}, interpreter=False)
    assert {(c.kwargs["BLOCK_M"], c.num_stages) for c in large16} >= {(256, 3), (256, 4)}


# --------------------------------------------------------------------------- #
# PyTorch paths, format helpers, checks
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", ["dense", "gather", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backends_match_reference(backend, dtype):
    n, k = 96, 128
    x, v, c, r, b = make_problem(n, k, (32, 16), (3, 7), dtype, empty_row=2, device="cpu")
    y = blocksparse_matmul(x.transpose(0, 1), v, c, r, n, k, b, backend=backend)
    check_against_reference(x.transpose(0, 1), v, c, r, n, k, b, y)


def test_cpu_heuristic_picks_gather_only_when_very_sparse():
    sparse = torch.tensor([0, 1, 1, 3])  # widest row: 2 of 24 block-columns
    dense = torch.tensor([0, 20, 40, 60])
    assert bsm._prefer_gather(197, sparse, 24)
    assert not bsm._prefer_gather(197, dense, 24)
    assert not bsm._prefer_gather(8 * 197, sparse, 24)


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_dense_to_bsr_matches_torch_bsr_and_round_trips():
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 6, generator=gen) < 0.4
    mask[2] = False
    weight = torch.randn(128, 96, generator=gen) * mask.repeat_interleave(32, 0).repeat_interleave(16, 1)
    values, cols, row_ptr = dense_to_bsr(weight, (32, 16))
    ref = weight.to_sparse_bsr((32, 16))
    assert torch.equal(row_ptr, ref.crow_indices()) and torch.equal(cols, ref.col_indices())
    assert torch.equal(values, ref.values())
    assert torch.equal(bsr_to_dense(values, cols, row_ptr, (128, 96)), weight)
    # An explicit mask keeps selected blocks even when they hold only zeros.
    full = torch.ones(4, 6, dtype=torch.bool)
    v_all, _, r_all = dense_to_bsr(weight, (32, 16), full)
    assert v_all.shape == (24, 32, 16) and r_all.tolist() == [0, 6, 12, 18, 24]


@pytest.mark.parametrize("case, match", [
    ("bad_block", "does not divide"),
    ("bad_k", "last dim"),
    ("dtype_mismatch", "share a floating dtype"),
    ("float_indices", "col_indices"),
    ("short_row_ptr", "row_ptr must be"),
    ("bad_bias", "bias must be"),
    ("bad_col_range", r"col_indices must lie"),
    ("bad_row_ptr_values", "non-decreasing"),
    ("duplicate_block", "strictly increasing"),
    ("bad_backend", "backend must be"),
    ("non_pow2_triton", "power-of-two"),
])
def test_input_validation(case, match):
    x = torch.randn(4, 64)
    v, c, r = dense_to_bsr(torch.randn(64, 64), (32, 32))
    args = dict(x=x, values=v, col_indices=c, row_ptr=r, n_out=64, k_in=64, bias=None)
    kwargs = {}
    if case == "bad_block":
        args["n_out"] = 48
    elif case == "bad_k":
        args["x"] = torch.randn(4, 32)
    elif case == "dtype_mismatch":
        args["values"] = v.half()
    elif case == "float_indices":
        args["col_indices"] = c.float()
    elif case == "short_row_ptr":
        args["row_ptr"] = r[:-1]
    elif case == "bad_bias":
        args["bias"] = torch.randn(32)
    elif case == "bad_col_range":
        args["col_indices"] = c + 5
    elif case == "bad_row_ptr_values":
        args["row_ptr"] = r.flip(0)
    elif case == "duplicate_block":
        args["col_indices"] = torch.zeros_like(c)  # both blocks of row 0 at column 0
    elif case == "bad_backend":
        kwargs["backend"] = "cusparse"
    elif case == "non_pow2_triton":
        args["values"], args["col_indices"], args["row_ptr"] = dense_to_bsr(torch.randn(64, 48), (16, 24))
        args["x"], args["k_in"] = torch.randn(4, 48), 48
        kwargs["backend"] = "triton"
    with pytest.raises(ValueError, match=match):
        blocksparse_matmul(**args, **kwargs)


# --------------------------------------------------------------------------- #
# fxprune::blocksparse_linear registration
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bias, lead, index_dtype", [(True, (5,), torch.int64), (False, (2, 3), torch.int32)])
def test_opcheck_custom_op(bias, lead, index_dtype):
    x, v, c, r, b = make_problem(64, 96, (32, 32), lead, torch.float32, bias=bias, empty_row=0, device="cpu")
    x.requires_grad_(True)
    v.requires_grad_(True)
    args = (x, v, c.to(index_dtype), r.to(index_dtype), 64, 96, b.requires_grad_(True) if bias else None)
    result = torch.library.opcheck(torch.ops.fxprune.blocksparse_linear.default, args)
    assert all(status == "SUCCESS" for status in result.values()), result
    y = torch.ops.fxprune.blocksparse_linear(*args)
    check_against_reference(x.detach(), v.detach(), c, r, 64, 96, b.detach() if bias else None, y.detach())


def test_custom_op_gradcheck_float64():
    # Small on purpose: the numerical Jacobian costs one op call per input element.
    x, v, c, r, b = make_problem(48, 32, (16, 16), (2, 2), torch.float64, empty_row=1, density=0.3, device="cpu")
    assert 0 < v.shape[0] < 6
    inputs = (x.requires_grad_(True), v.requires_grad_(True), b.requires_grad_(True))

    def fn(x_, v_, b_):
        return torch.ops.fxprune.blocksparse_linear(x_, v_, c, r, 48, 32, b_)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~1000 tiny calls: thread wake-ups would dominate
    try:
        assert torch.autograd.gradcheck(fn, inputs)
    finally:
        torch.set_num_threads(threads)
