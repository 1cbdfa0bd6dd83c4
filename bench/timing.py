"""Shared timing helper for the CPU latency benches (``bench_latency.py``, ``bench_papr.py``)."""
from __future__ import annotations

import statistics
import time

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
