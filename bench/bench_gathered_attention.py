"""Benchmark of gathered-patch attention (PaPr token pruning) at ViT-B shapes.

Shapes: N=197 tokens, H=12 heads, D=64, K=int(N*z) kept tokens for keep
ratios z in {1.0, 0.7, 0.5, 0.3}.  Providers:

* ``reference`` -- gather the kept rows of qkv, then ``F.scaled_dot_product_attention``;
* ``full``      -- SDPA over all N tokens (the cost without pruning);
* ``ours``      -- the fused Triton kernel (CUDA only).

CPU: fp32, batch 1 and 8, ``reference`` and ``full`` only, single-threaded
by default (``FXPRUNE_BENCH_THREADS=N`` to change it).
GPU: bf16, batch 1, 8 and 64, all three providers, timed with
``triton.testing.do_bench`` for the recorded ratios.

Each case records in ``benchmark.extra_info``: ``K``, ``z``, its own time
``ms`` and the time of ``full`` on the same batch (``full_ms``), measured with
the same timer (GPU: median of ``do_bench``; CPU: minimum of 25 calls, which
is robust to other load on the cores), and ``ratio_vs_full = ms / full_ms``
(< 1 means pruning pays); on GPU the ``ours`` cases also record
``ratio_vs_reference``.  The pytest-benchmark table itself shows the usual
pedantic-mode statistics of each provider.

Run (from the repository root)::

    pytest bench/bench_gathered_attention.py --benchmark-only -q
    # ratios in machine-readable form:
    pytest bench/bench_gathered_attention.py --benchmark-only -q --benchmark-json=ga.json
    # GPU: make sure the Triton interpreter is off
    TRITON_INTERPRET=0 pytest bench/bench_gathered_attention.py --benchmark-only -q
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from timing import device_ms

from fxprune.kernels.gathered_attention import gathered_attention, gathered_attention_reference

log = logging.getLogger(__name__)

N_TOKENS, HEADS, HEAD_DIM = 197, 12, 64  # ViT-B/16 at 224x224
KEEP_RATIOS = (1.0, 0.7, 0.5, 0.3)
HAS_CUDA = torch.cuda.is_available()
# CPU intra-op threads. Default 1: with several threads, a preempted worker on
# a shared or oversubscribed machine stalls a whole op for a scheduler slice,
# which swamps the sub-millisecond timings.
CPU_THREADS = int(os.environ.get("FXPRUNE_BENCH_THREADS", "1"))


@pytest.fixture
def cpu_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield CPU_THREADS
    torch.set_num_threads(saved)


def _cases() -> list:
    cases = []
    for z in KEEP_RATIOS:
        for batch in (1, 8):
            for provider in ("reference", "full"):
                cases.append(pytest.param("cpu", provider, z, batch, id=f"cpu-{provider}-z{z}-b{batch}"))
    no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
    for z in KEEP_RATIOS:
        for batch in (1, 8, 64):
            for provider in ("reference", "full", "ours"):
                cases.append(pytest.param("cuda", provider, z, batch, id=f"cuda-{provider}-z{z}-b{batch}",
                                          marks=no_cuda))
    return cases


def _make_inputs(device: str, batch: int, k_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv as a ViT's qkv Linear produces it, and PaPr-style indices (class token kept)."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv = torch.randn(batch, N_TOKENS, 3, HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    rows = []
    for _ in range(batch):
        patches = torch.randperm(N_TOKENS - 1, generator=gen)[: k_tokens - 1] + 1
        rows.append(torch.cat([torch.zeros(1, dtype=torch.long), patches]))
    return qkv, torch.stack(rows).to(device)


def _full_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Unpruned attention over all N tokens, same output layout as the others."""
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()


def _provider_fn(provider: str, qkv: torch.Tensor, idx: torch.Tensor) -> Callable[[], torch.Tensor]:
    if provider == "reference":
        return lambda: gathered_attention_reference(qkv, idx)
    if provider == "full":
        return lambda: _full_attention(qkv)
    return lambda: gathered_attention(qkv, idx, backend="triton", check_indices=False)


@pytest.mark.parametrize("device, provider, z, batch", _cases())
def test_gathered_attention(benchmark, cpu_threads, device: str, provider: str, z: float, batch: int) -> None:
    k_tokens = int(N_TOKENS * z)
    qkv, idx = _make_inputs(device, batch, k_tokens)
    fn = _provider_fn(provider, qkv, idx)
    out = fn()  # warm-up (and autotuning for "ours")
    expected_tokens = N_TOKENS if provider == "full" else k_tokens
    assert out.shape == (batch, expected_tokens, HEADS, HEAD_DIM)

    ms = device_ms(fn, device, reduce=min)
    full_ms = ms if provider == "full" else device_ms(_provider_fn("full", qkv, idx), device, reduce=min)
    benchmark.extra_info.update(
        device=device, dtype=str(qkv.dtype), batch=batch, z=z, K=k_tokens, N=N_TOKENS,
        ms=ms, full_ms=full_ms, ratio_vs_full=ms / full_ms,
    )
    if device == "cpu":
        benchmark.extra_info["threads"] = cpu_threads
    if provider == "ours":
        ref_ms = device_ms(_provider_fn("reference", qkv, idx), device, reduce=min)
        benchmark.extra_info.update(reference_ms=ref_ms, ratio_vs_reference=ms / ref_ms)
        ref = gathered_attention_reference(qkv.float(), idx)
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)
    log.info("gathered_attention %s/%s z=%.1f B=%d: %.3f ms (%.2fx full)",
             device, provider, z, batch, ms, ms / full_ms)

    if device == "cuda":
        def run() -> None:
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.pedantic(run, rounds=10 if batch < 8 or device == "cuda" else 5, warmup_rounds=1)
