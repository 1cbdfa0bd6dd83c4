"""Measured per-layer latency for the hardware-aware term of the ``blocksparse`` stage (``latency`` field).

LPViT adds a per-layer power/latency term so that layers whose blocks cost more *time* are pruned more. Our
extension measures it: the dense ``F.linear`` of each chosen layer, at the tokens it sees, on the device and dtype
of its weight (median of interleaved timed runs after a warm-up). Results go through the shared latency cache
(``fxprune.latency.cache``: in memory and in ``$FXPRUNE_CACHE_DIR/latency.json``, default ``~/.cache/fxprune``),
keyed by device name, dtype, thread count and shape, so a shape is timed once per machine; the ``latency`` target's
lookup tables live in the same file.

The allocation uses each layer's *time per MAC* relative to the MAC-weighted mean over the chosen layers,
``e_l``: a block's distortion is divided by ``e_l ** latency`` (``latency = 0``: off; ``1``: distortion per unit of
time saved rather than per MAC). The budget itself stays in MACs or blocks.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...latency import cache
from ...latency.cache import cache_path
from .layers import LinearLayer

log = logging.getLogger(__name__)
_MEMORY: dict[str, float] = {}


def table_key(device: torch.device, dtype: torch.dtype, tokens: int, out_features: int, in_features: int) -> str:
    return f"{cache.key_prefix(device, dtype)}|linear|{tokens}x{in_features}->{out_features}"


def _linear_call(tokens: int, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype):
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    w = torch.randn(out_features, in_features, device=device, dtype=dtype)
    return lambda: F.linear(x, w)


def time_linear(tokens: int, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype,
                runs: int = 7) -> float:
    """Median milliseconds of ``F.linear`` on ``[tokens, in] x [out, in]^T`` (synchronised on CUDA)."""
    call = _linear_call(tokens, out_features, in_features, device, dtype)
    return cache.interleaved_ms([call], device, warmup=2, repeats=runs)[0]


def layer_latencies(layers: Sequence[LinearLayer]) -> list[float]:
    """Measured dense milliseconds of every layer, from the cache when present (then stored back)."""
    probes, keys = {}, []
    for layer in layers:
        w = layer.module.weight
        shape = (layer.tokens, layer.module.out_features, layer.module.in_features)
        key = table_key(w.device, w.dtype, *shape)
        probes[key] = (lambda shape=shape, w=w: _linear_call(*shape, w.device, w.dtype))
        keys.append(key)
    device = layers[0].module.weight.device if layers else torch.device("cpu")
    got = cache.measure_cached(probes, device, memory=_MEMORY, repeats=7)
    return [got[k] for k in keys]


def efficiency_factors(layers: Sequence[LinearLayer], latencies: Sequence[float]) -> list[float]:
    """``e_l``: a layer's milliseconds per MAC over the MAC-weighted mean of the chosen layers (1 = average)."""
    macs = [layer.n_blocks * layer.block_macs for layer in layers]
    mean = sum(latencies) / sum(macs)
    return [(t / m) / mean if m and mean > 0 else 1.0 for t, m in zip(latencies, macs)]


__all__ = ["cache_path", "table_key", "time_linear", "layer_latencies", "efficiency_factors"]
