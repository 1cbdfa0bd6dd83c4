"""Measured latency: the shared on-disk cache and timing (``cache``), timed op models of prunable layers (``ops``),
in-model times of single nodes (``volume``) and the per-layer lookup table the ``latency`` target plans against
(``table``). The ``blocksparse`` stage's hardware-aware term reads the same cache."""
from .cache import cache_path, interleaved_ms, measure_cached, median_halfwidth, model_ratios, round_ratios
from .ops import OpModel, op_model
from .table import LatencyTable, grid_widths
from .volume import node_ms

__all__ = ["LatencyTable", "OpModel", "cache_path", "grid_widths", "interleaved_ms", "measure_cached",
           "median_halfwidth", "model_ratios", "node_ms", "op_model", "round_ratios"]
