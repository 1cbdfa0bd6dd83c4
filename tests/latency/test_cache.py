"""The shared latency cache: keys name device, threads, torch, dtype and op; entries are reused across runs and
re-timed on request."""
from __future__ import annotations

import json

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
