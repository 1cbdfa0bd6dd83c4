"""Measured per-layer latency for the hardware-aware term of the ``blocksparse`` stage (``latency`` field).

LPViT adds a per-layer power/latency term so that layers whose blocks cost more *time* are pruned more. Our
extension measures it: the dense ``F.linear`` of each chosen layer, at the tokens it sees, on the device and dtype
of its weight (median of a few timed runs after a warm-up). Results are cached in memory and in a JSON table
(``$FXPRUNE_CACHE_DIR/latency.json``, default ``~/.cache/fxprune``), keyed by device name, dtype, thread count
and shape, so a shape is timed once per machine.

The allocation uses each layer's *time per MAC* relative to the MAC-weighted mean over the chosen layers,
``e_l``: a block's distortion is divided by ``e_l ** latency`` (``latency = 0``: off; ``1``: distortion per unit of
time saved rather than per MAC). The budget itself stays in MACs or blocks.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .layers import LinearLayer

log = logging.getLogger(__name__)
_MEMORY: dict[str, float] = {}


def cache_path() -> Path:
    return Path(os.environ.get("FXPRUNE_CACHE_DIR", Path.home() / ".cache" / "fxprune")) / "latency.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()}threads"


def table_key(device: torch.device, dtype: torch.dtype, tokens: int, out_features: int, in_features: int) -> str:
    return f"{_device_name(device)}|{str(dtype).replace('torch.', '')}|linear|{tokens}x{in_features}->{out_features}"


def _load() -> dict[str, float]:
    path = cache_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring an unreadable latency table at %s", path)
        data = {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def _store(table: dict[str, float]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only home must not stop pruning
        log.warning("could not write the latency table %s: %s", path, exc)


def time_linear(tokens: int, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype,
                runs: int = 7) -> float:
    """Median milliseconds of ``F.linear`` on ``[tokens, in] x [out, in]^T`` (synchronised on CUDA)."""
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    w = torch.randn(out_features, in_features, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):
            sync()
            start = time.perf_counter()
            F.linear(x, w)
            sync()
            if i >= 2:  # two warm-up runs
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def layer_latencies(layers: Sequence[LinearLayer]) -> list[float]:
    """Measured dense milliseconds of every layer, from the cache when present (then stored back)."""
    table = None
    out = []
    for layer in layers:
        w = layer.module.weight
        key = table_key(w.device, w.dtype, layer.tokens, layer.module.out_features, layer.module.in_features)
        if key not in _MEMORY:
            table = _load() if table is None else table
            if key not in table:
                table[key] = time_linear(layer.tokens, layer.module.out_features, layer.module.in_features,
                                         w.device, w.dtype)
                log.debug("latency table: %s = %.3f ms (measured)", key, table[key])
                _store(table)
            _MEMORY[key] = table[key]
        out.append(_MEMORY[key])
    return out


def efficiency_factors(layers: Sequence[LinearLayer], latencies: Sequence[float]) -> list[float]:
    """``e_l``: a layer's milliseconds per MAC over the MAC-weighted mean of the chosen layers (1 = average)."""
    macs = [layer.n_blocks * layer.block_macs for layer in layers]
    mean = sum(latencies) / sum(macs)
    return [(t / m) / mean if m and mean > 0 else 1.0 for t, m in zip(latencies, macs)]
