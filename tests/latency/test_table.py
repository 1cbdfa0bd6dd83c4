"""The per-layer latency lookup table: grid on round_to, synthetic timings interpolated exactly, reuse across
runs from the on-disk cache, the step finder of ``round_to: "auto"``."""
from __future__ import annotations

import json

import numpy as np
import torch
from fixtures import ResCatNet

from fxprune.analysis import analyze
from fxprune.latency import LatencyTable, grid_widths
from fxprune.latency.table import _fit_step
from fxprune.trace import record_shapes, trace

X = torch.randn(1, 3, 8, 8)


def analysed(model=None):
    model = (model or ResCatNet(width=16, fuse=16, classes=4)).eval()
    gm = trace(model, example_inputs=(X,))
    record_shapes(gm, (X,))
    return analyze(gm)


def synthetic(model, a: int, b: int) -> float:
    """A bilinear latency (what bilinear interpolation reproduces exactly)."""
    return 1e-3 * a * max(b, 1) + 0.01


def test_grid_follows_round_to_and_keeps_the_full_width() -> None:
    assert grid_widths(64, 8).tolist() == [8, 24, 48, 64]  # 0.1, 0.4, 0.7 of 64 on multiples of 8, and 64
    assert all(w % 8 == 0 for w in grid_widths(64, 8))
    assert grid_widths(30, 8).tolist()[-1] == 30  # the full width even when it is no multiple


def test_synthetic_table_interpolates_exactly() -> None:
    a = analysed()
    table = LatencyTable(a, measure=synthetic)
    assert len(table.entries) == 6 and all(e.model is not None for e in table.entries)
    assert np.isclose(table.layers_ms, sum(synthetic(None, *e.model.full) for e in table.entries))
    # body.0's output channels (32) are body.3's input channels: both parameter axes shrink together
    spaces = [s for s in a.spaces if (s.owner, s.dim) in (("@body.0", 0), ("@body.3", 1))]
    layers = {e.node: e for e in table.entries}
    before = layers_sum = table.layers_at({})
    after = table.layers_at({s: 13 for s in spaces})
    # body.0 (32 x 16 -> 13 x 16) and body.3 reading it (16 x 32 -> 16 x 13)
    expected = 1e-3 * (32 * 16 - 13 * 16) + 1e-3 * (16 * 32 - 16 * 13)
    assert np.isclose(before - after, expected) and layers_sum > after
    assert "body_0" in layers and "body_3" in layers


def test_table_reuses_the_disk_cache_across_runs(tmp_path, monkeypatch) -> None:
    from fxprune.latency import cache

    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "MEMORY", {})
    a = analysed()
    first = LatencyTable(a, fractions=(0.5, 1.0))
    stored = json.loads((tmp_path / "latency.json").read_text())
    assert stored and all("|conv2d|" in k or "|linear|" in k for k in stored)
    assert len(stored) < 4 * len(first.entries)  # one entry per distinct signature and width, not per layer
    # a new process: the file answers (the values prove it), nothing is timed
    monkeypatch.setattr(cache, "MEMORY", {})
    (tmp_path / "latency.json").write_text(json.dumps({k: 2.0 for k in stored}))
    second = LatencyTable(a, fractions=(0.5, 1.0))
    assert all(e.full_ms == 2.0 for e in second.entries)


def test_step_fit_finds_a_staircase() -> None:
    widths = [64 + k for k in (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)]
    stairs = [float(-(-w // 16) * 16) for w in widths]
    assert _fit_step(widths, stairs, (1, 2, 4, 8, 16, 32, 64)) == 16
    assert _fit_step(widths, [float(w) for w in widths], (1, 2, 4, 8, 16, 32, 64)) == 1
