"""Shared timing helpers for the CPU latency benches (``bench_latency.py``, ``bench_papr.py``)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

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
    """Wall times in milliseconds of each call, ``runs`` rounds that call each one once in turn (after one warm-up
    round), in inference mode. Interleaving spreads the machine's slow spells over all calls alike, so ratios of the
    minima or medians are fair even on a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(runs):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t) * 1e3)
    return times
