"""Shared timing helpers for the CPU latency benches (``bench_latency.py``, ``bench_papr.py``)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


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
