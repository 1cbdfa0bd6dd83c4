"""Block-sparse linear vs dense ``F.linear`` vs torch BSR on ViT-B/16 layer shapes.

Providers (``y = x @ W^T``, ``W`` block-sparse with 32x32 blocks):

* ``dense``: ``F.linear`` with the (masked) dense weight, the baseline;
* ``ours``: ``torch.ops.fxprune.blocksparse_linear`` (Triton kernel on CUDA, the
  dense-equivalent / gather PyTorch path on CPU);
* ``torch_bsr``: ``F.linear`` with ``weight.to_sparse_bsr((32, 32))``.

Shapes: fc1 (3072x768), fc2 (768x3072), qkv (2304x768), proj (768x768) applied to
``batch x 197`` tokens; sparsity 0.5 / 0.75 / 0.9 of the blocks pruned.

Run::

    pytest bench/bench_blocksparse.py --benchmark-only -q            # batch 1 and 8 (CPU: ~2-3 min)
    FXPRUNE_BENCH_FULL=1 pytest bench/bench_blocksparse.py --benchmark-only -q   # batch 1/8/64/256
    pytest bench/bench_blocksparse.py --benchmark-only -q -k "fc1 and ours"      # a slice

On a shared or busy CPU, ``OMP_NUM_THREADS=1`` gives far steadier ratios (thread
wake-ups of the small parallel regions otherwise dominate).  On CPU the data are
fp32; on CUDA they are bf16 and every case also records
``triton.testing.do_bench`` timings.  ``benchmark.extra_info`` holds
``speedup_vs_dense`` (dense time / this provider's time; > 1 means faster).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from fxprune.kernels.blocksparse_matmul import dense_to_bsr

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BLOCK = (32, 32)
TOKENS = 197
SHAPES = {"fc1": (3072, 768), "fc2": (768, 3072), "qkv": (2304, 768), "proj": (768, 768)}
FULL = os.environ.get("FXPRUNE_BENCH_FULL", "0") == "1"
BATCHES = (1, 8, 64, 256) if FULL or CUDA else (1, 8)
SPARSITIES = (0.5, 0.75, 0.9)
PROVIDERS = ("dense", "ours", "torch_bsr")
# Target wall time per case on CPU; slow providers get at least MIN_ROUNDS rounds.
TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 0.3, 3, 20

CASES = [
    pytest.param(layer, batch, sparsity, provider, id=f"{layer}-b{batch}-s{sparsity}-{provider}")
    for layer in SHAPES for batch in BATCHES for sparsity in SPARSITIES for provider in PROVIDERS
]
_dense_ms: dict[tuple[str, int], float] = {}


def _problem(layer: str, batch: int, sparsity: float):
    """x[batch*197, K] and a weight [N, K] with exactly round(sparsity * blocks) pruned blocks."""
    n, k = SHAPES[layer]
    gen = torch.Generator().manual_seed(10 * list(SHAPES).index(layer) + SPARSITIES.index(sparsity))
    rows, cols = n // BLOCK[0], k // BLOCK[1]
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols, generator=gen)[: round((1 - sparsity) * rows * cols)]] = True
    mask = keep.view(rows, cols)
    weight = torch.randn(n, k, generator=gen) * mask.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
    x = torch.randn(batch * TOKENS, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    to = dict(device=DEVICE, dtype=DTYPE)
    return x.to(**to), weight.to(**to), bias.to(**to), mask.to(DEVICE)


def _make_fn(provider: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             mask: torch.Tensor) -> Callable[[], torch.Tensor]:
    if provider == "dense":
        return lambda: F.linear(x, weight, bias)
    if provider == "torch_bsr":
        w_bsr = weight.to_sparse_bsr(BLOCK)
        return lambda: F.linear(x, w_bsr, bias)
    values, col_indices, row_ptr = dense_to_bsr(weight, BLOCK, mask)
    n, k = weight.shape
    return lambda: torch.ops.fxprune.blocksparse_linear(x, values, col_indices, row_ptr, n, k, bias)


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@pytest.mark.parametrize("layer, batch, sparsity, provider", CASES)
def test_blocksparse_linear(benchmark, layer: str, batch: int, sparsity: float, provider: str) -> None:
    x, weight, bias, mask = _problem(layer, batch, sparsity)
    try:
        fn = _make_fn(provider, x, weight, bias, mask)
        start = time.perf_counter()
        out = fn()  # warm-up (Triton autotune / compile on CUDA), and the CPU probe
        probe_ms = (time.perf_counter() - start) * 1e3
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"{provider} unsupported here: {exc}")
    ref = F.linear(x.float(), weight.float(), bias.float())
    tol = 5e-2 if DTYPE == torch.bfloat16 else 1e-3
    assert torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    benchmark.group = f"{layer}-b{batch}-s{sparsity}"
    benchmark.extra_info.update(layer=layer, shape=SHAPES[layer], tokens=batch * TOKENS, sparsity=sparsity,
                                block=BLOCK, dtype=str(DTYPE), provider=provider)

    if CUDA:
        import triton.testing

        def synced() -> None:
            fn()
            torch.cuda.synchronize()

        ms = triton.testing.do_bench(fn)
        key = (layer, batch)
        if key not in _dense_ms:
            _dense_ms[key] = triton.testing.do_bench(_make_fn("dense", x, weight, bias, mask))
        benchmark.extra_info.update(do_bench_ms=ms, dense_do_bench_ms=_dense_ms[key],
                                    speedup_vs_dense=_dense_ms[key] / ms)
        benchmark.pedantic(synced, rounds=20, warmup_rounds=2, iterations=1)
        return

    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S * 1e3 / max(probe_ms, 1e-3))))
    # The dense baseline is timed in the (untimed) setup of every round, i.e.
    # interleaved with this provider, so the ratio survives a busy machine.
    dense_fn, dense_times = _make_fn("dense", x, weight, bias, mask), []
    setup = None if provider == "dense" else (lambda: dense_times.append(_median_ms(dense_fn, repeats=1)))
    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a plain test
        return
    median_ms = benchmark.stats.stats.median * 1e3
    dense_ms = statistics.median(dense_times) if dense_times else median_ms
    benchmark.extra_info.update(median_ms=median_ms, dense_median_ms=dense_ms, speedup_vs_dense=dense_ms / median_ms)
