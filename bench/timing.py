"""Shared timing helpers for the CPU latency benches (``bench_latency.py``, ``bench_papr.py``)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import statistics
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def steady_allocator(mmap_mb: int = 32, trim_mb: int = 1024) -> bool:
    """Keep this process's large CPU tensors in glibc's heap (``mallopt``): blocks up to ``mmap_mb`` MB are not
    mmapped, and up to ``trim_mb`` MB of free heap is kept rather than handed back to the kernel.

    By default glibc mmaps big blocks and adjusts that threshold as blocks are freed, so a forward pass whose
    activations are megabytes each pays page faults that depend on the allocation history: on DigitsCNN at
    batch 360 (2 threads) the same model took 33-45 ms or 22 ms from one process to the next, and two copies of
    it timed interleaved gave per-round ratios of 0.63-1.37; with this setting 22 ms and 0.77-1.13. The setting
    is process-wide and stays; benches call it first and say so. Returns whether glibc accepted it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                       trim_mb << 20))
    except (OSError, AttributeError):
        ok = False
    log.warning("steady allocator (glibc mallopt: mmap threshold %d MB, trim threshold %d MB): %s", mmap_mb,
                trim_mb, "on" if ok else "not available; timings keep the default allocator's page faults")
    return ok


def median_ms(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median wall time of ``model(x)`` in milliseconds over ``runs`` calls, after one warm-up, in inference mode."""
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def interleaved_ms(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Per-run times in milliseconds of each call over ``runs`` rounds that call each one once, in inference mode,
    after one warm-up round. Every other round runs the calls in reverse order. Interleaving spreads the machine's
    slow spells over all calls alike, so ratios of minima or medians stay fair on a shared machine.

    Returns the wall times under each name, and the calling thread's CPU times under ``name + "_cpu"`` (steadier
    when other processes compete for the cores, but blind to intra-op worker threads)."""
    times: dict[str, list[float]] = {}
    for name in calls:
        times[name], times[name + "_cpu"] = [], []
    with torch.inference_mode():
        for call in calls.values():
            call()
        for r in range(runs):
            for name, call in (list(calls.items()) if r % 2 == 0 else list(calls.items())[::-1]):
                start, cpu = time.perf_counter(), time.thread_time()
                call()
                times[name + "_cpu"].append((time.thread_time() - cpu) * 1e3)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def device_ms(fn: Callable[[], object], device: str, reps: int = 25,
              reduce: Callable[[list[float]], float] = statistics.median) -> float:
    """Milliseconds of ``fn``: ``triton.testing.do_bench``'s median on CUDA; on CPU ``reduce`` (median, or ``min``
    to resist other processes on the cores) of ``reps`` wall-clock calls after one warm-up call."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return float(reduce(samples))
