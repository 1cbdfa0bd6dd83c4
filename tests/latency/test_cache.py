"""The shared latency cache: keys name device, threads, torch, dtype and op; entries are reused across runs and
re-timed on request."""
from __future__ import annotations

import json
import math
import random
import statistics
import time

import numpy as np
import torch

from fxprune.latency import cache


def _counting(calls: list[str], name: str):
    def factory():
        calls.append(name)
        x = torch.randn(8, 8)
        return lambda: x @ x
    return factory


def test_key_names_device_threads_torch_and_dtype() -> None:
    cpu = torch.device("cpu")
    key = cache.key_prefix(cpu, torch.float32)
    assert key.startswith(f"cpu:{torch.get_num_threads()}threads:torch") and key.endswith("|float32")
    assert cache.key_prefix(cpu, torch.bfloat16) != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cache.key_prefix(cpu, torch.float32) != key  # another thread count: another table
    finally:
        torch.set_num_threads(threads)


def test_measured_once_then_reused_from_disk_and_refreshed_on_request(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    cpu, calls = torch.device("cpu"), []
    probes = {"k|a": _counting(calls, "a"), "k|b": _counting(calls, "b")}
    first = cache.measure_cached(probes, cpu, memory={}, repeats=2)
    assert sorted(calls) == ["a", "b"] and all(v > 0 for v in first.values())
    on_disk = json.loads((tmp_path / "latency.json").read_text())
    assert on_disk == first
    # a new process (empty memory): the file answers, nothing is timed
    (tmp_path / "latency.json").write_text(json.dumps({"k|a": 1.5, "k|b": 2.5}))
    assert cache.measure_cached(probes, cpu, memory={}, repeats=2) == {"k|a": 1.5, "k|b": 2.5}
    assert len(calls) == 2
    # only a missing key is timed, and it is added to what is there
    more = {**probes, "k|c": _counting(calls, "c")}
    assert cache.measure_cached(more, cpu, memory={}, repeats=2)["k|a"] == 1.5 and calls[-1] == "c"
    assert set(json.loads((tmp_path / "latency.json").read_text())) == {"k|a", "k|b", "k|c"}
    # invalidation on request: every key asked for is re-timed and overwritten
    monkeypatch.setenv("FXPRUNE_LATENCY_REFRESH", "1")
    fresh = cache.measure_cached(probes, cpu, memory={"k|a": 1.5}, repeats=2)
    assert len(calls) == 5 and fresh["k|a"] != 1.5
    assert json.loads((tmp_path / "latency.json").read_text())["k|a"] == fresh["k|a"]


def test_an_unreadable_table_is_ignored_and_replaced(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    (tmp_path / "latency.json").write_text("{not json")
    calls: list[str] = []
    out = cache.measure_cached({"k": _counting(calls, "k")}, torch.device("cpu"), memory={}, repeats=1)
    assert calls == ["k"] and json.loads((tmp_path / "latency.json").read_text()) == out


def test_median_halfwidth_covers_the_true_median_95_percent_of_the_time() -> None:
    g = np.random.default_rng(0)
    n, trials = 200, 400
    hits, widths = 0, []
    for _ in range(trials):
        samples = list(g.standard_normal(n))
        h = cache.median_halfwidth(samples)
        widths.append(h)
        hits += abs(statistics.median(samples)) <= h
    assert abs(statistics.median(widths) - 1.96 * math.sqrt(math.pi / 2) / math.sqrt(n)) < 0.01
    assert 0.92 <= hits / trials <= 0.98
    assert cache.median_halfwidth([1.0, 2.0, 3.0]) == math.inf


class _Jitter(torch.nn.Module):
    """Sleeps 1-3 ms at random on each call: a model whose timing is noisy."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.g = random.Random(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.g.uniform(1e-3, 3e-3))
        return x


def test_round_ratios_adds_rounds_while_imprecise_within_the_time_limit() -> None:
    models, x = [_Jitter(0), _Jitter(1)], (torch.zeros(1),)
    times, ratios = cache.round_ratios(models, x, repeats=5)
    assert [len(t) for t in times] == [5, 5] and len(ratios[1]) == 5
    times, _ = cache.round_ratios(models, x, repeats=5, precision=100.0, max_s=5.0)  # precise enough at once
    assert len(times[0]) == 5
    start = time.perf_counter()
    times, ratios = cache.round_ratios(models, x, repeats=5, precision=1e-9, max_s=0.3)  # never precise enough
    took = time.perf_counter() - start
    assert len(times[0]) > 5 and len(times[0]) % 5 == 0 and len(ratios[1]) == len(times[1])
    assert took < 0.3 + 5 * 2 * 3.5e-3 + 0.1  # stops at the first check past max_s
    assert ratios[1] == [b / a for a, b in zip(times[0], times[1])]
    times, _ = cache.round_ratios(models[:1], x, repeats=5, precision=1e-9, max_s=0.3)  # no ratio to refine
    assert len(times[0]) == 5
