"""The measured-latency cache and the timing primitive every latency figure of fxprune goes through.

One JSON table (``$FXPRUNE_CACHE_DIR/latency.json``, default ``~/.cache/fxprune``) maps a key to milliseconds.
A key names the device (CUDA device name, or CPU with its thread count), the torch version, the dtype and the op
signature with its concrete shapes (``cpu:2threads:torch2.4.0|float32|conv2d|...``), so a shape is timed once per
machine and software stack; a new torch version, thread count or dtype makes new keys (the old entries are then
never read). ``FXPRUNE_LATENCY_REFRESH=1`` re-times every key asked for (and overwrites it).

``measure_cached`` looks keys up in a process-local memory dict first, then in the JSON table, and times only the
keys that are missing, all of them together with ``interleaved_ms`` (warm-up round, then rounds that call each op
once, every other round in reverse order, median per op), so the machine's slow spells hit every op alike.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: process-local cache shared by every caller that does not bring its own
MEMORY: dict[str, float] = {}


def cache_path() -> Path:
    """Where the latency table lives (``$FXPRUNE_CACHE_DIR/latency.json``)."""
    return Path(os.environ.get("FXPRUNE_CACHE_DIR", Path.home() / ".cache" / "fxprune")) / "latency.json"


def device_name(device: torch.device) -> str:
    """The device part of a key: the CUDA device's name, or the CPU with the current thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()}threads"


def key_prefix(device: torch.device, dtype: torch.dtype) -> str:
    """``device|dtype`` with the torch version: everything of a key but the op signature."""
    version = torch.__version__.split("+")[0]
    return f"{device_name(device)}:torch{version}|{str(dtype).replace('torch.', '')}"


def load() -> dict[str, float]:
    """The table on disk (empty when missing or unreadable)."""
    path = cache_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring an unreadable latency table at %s", path)
        data = {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def store(entries: Mapping[str, float]) -> None:
    """Merge ``entries`` into the table on disk (read again first: another process may have added keys)."""
    path = cache_path()
    table = {**load(), **entries}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only home must not stop pruning
        log.warning("could not write the latency table %s: %s", path, exc)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _rounds(calls: Sequence[Callable[[], object]], device: torch.device, warmup: int,
            repeats: int) -> list[list[float]]:
    """Milliseconds of each call in each of ``repeats`` rounds (after ``warmup`` rounds; every other round in
    reverse order), in inference mode, synchronised on CUDA."""
    sync = _sync(device)
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for _ in range(warmup):
            for call in calls:
                call()
        sync()
        for r in range(repeats):
            order = range(len(calls)) if r % 2 == 0 else range(len(calls) - 1, -1, -1)
            for i in order:
                start = time.perf_counter()
                calls[i]()
                sync()
                times[i].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_ms(calls: Sequence[Callable[[], object]], device: torch.device, warmup: int = 1,
                   repeats: int = 5) -> list[float]:
    """Median milliseconds of each call: ``warmup`` rounds, then ``repeats`` rounds calling each once (every other
    round in reverse order), in inference mode, synchronised on CUDA."""
    return [statistics.median(t) for t in _rounds(calls, device, warmup, repeats)]


def measure_cached(probes: Mapping[str, Callable[[], Callable[[], object]]], device: torch.device,
                   memory: dict[str, float] | None = None, repeats: int = 5) -> dict[str, float]:
    """Milliseconds of every key of ``probes`` (key -> a factory returning the zero-argument call to time).

    Keys found in ``memory`` (default ``MEMORY``) or on disk are not timed; the others are timed together
    (``interleaved_ms``) and stored in both. Returns key -> milliseconds for every probe."""
    memory = MEMORY if memory is None else memory
    refresh = os.environ.get("FXPRUNE_LATENCY_REFRESH", "") not in ("", "0")
    out = {k: memory[k] for k in probes if k in memory and not refresh}
    missing = [k for k in probes if k not in out]
    if missing and not refresh:
        table = load()
        for k in missing:
            if k in table:
                out[k] = memory[k] = table[k]
        missing = [k for k in missing if k not in out]
    if missing:
        calls = [probes[k]() for k in missing]
        measured = dict(zip(missing, interleaved_ms(calls, device, repeats=repeats)))
        for k, ms in measured.items():
            log.debug("latency table: %s = %.4f ms (measured)", k, ms)
        memory.update(measured)
        out.update(measured)
        store(measured)
    return out


def _device(inputs: tuple) -> torch.device:
    return next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))


def median_halfwidth(samples: Sequence[float]) -> float:
    """The half-width of an approximate 95% confidence interval of the median of ``samples``: 1.96 times the
    median's asymptotic standard error, 1.2533 sigma / sqrt(n), with sigma estimated robustly as IQR / 1.349.
    Infinite below 4 samples."""
    if len(samples) < 4:
        return float("inf")
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return 1.96 * 1.2533 * (q3 - q1) / 1.349 / len(samples) ** 0.5


def round_ratios(models: Sequence[Callable[..., object]], inputs: tuple, repeats: int = 9, warmup: int = 1,
                 precision: float | None = None,
                 max_s: float = 0.0) -> tuple[list[list[float]], list[list[float]]]:
    """Milliseconds of each model on ``inputs`` in each of ``repeats`` interleaved rounds (see ``interleaved_ms``),
    and each model's time divided by the first model's in the same round, round by round (samples to pool).

    With ``precision``, ``repeats`` more rounds are added while the median ratio of some model is less precise
    than that (``median_halfwidth``) and the rounds so far took under ``max_s`` seconds: small, noisy models get
    the rounds they need, big ones stay at ``repeats``."""
    calls = [(lambda m=m: m(*inputs)) for m in models]
    device = _device(inputs)
    start = time.perf_counter()
    times = _rounds(calls, device, warmup, repeats)

    def ratios() -> list[list[float]]:
        return [[b / a if a else 1.0 for a, b in zip(times[0], t)] for t in times]

    while (precision is not None and len(models) > 1 and time.perf_counter() - start < max_s
           and max(median_halfwidth(r) for r in ratios()[1:]) > precision):
        for t, more in zip(times, _rounds(calls, device, 0, repeats)):
            t.extend(more)
    return times, ratios()


def model_ratios(models: Sequence[Callable[..., object]], inputs: tuple, repeats: int = 9,
                 warmup: int = 1) -> tuple[list[float], list[float]]:
    """Median milliseconds of each model on ``inputs``, and the median over rounds of each model's time divided by
    the first model's in the same round (``round_ratios``). The per-round ratio cancels the machine's drift between
    rounds, which a ratio of medians does not."""
    times, ratios = round_ratios(models, inputs, repeats, warmup)
    return [statistics.median(t) for t in times], [statistics.median(r) for r in ratios]


__all__ = ["MEMORY", "cache_path", "device_name", "key_prefix", "load", "store", "interleaved_ms", "measure_cached",
           "median_halfwidth", "model_ratios", "round_ratios"]
