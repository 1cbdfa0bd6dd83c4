"""Leaf modules that cache what they compute from their input (the Ultralytics ``Detect`` head's anchors) must not
keep the meta tensors of shape recording: regression for "Tensor on device cpu is not on the expected device meta"
in ``assert_masked_equals_shrunk`` on leaf models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fxprune.attribute_snapshot import restoring_attributes
from fxprune.testing import channel_recipe, prune_and_check


class CachingHead(nn.Module):
    """Adds a per-column offset made for the last input shape, cached like ``Detect.anchors`` (and in a dict)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 1)
        self.shape: tuple | None = None
        self.offset = torch.empty(0)
        self.by_shape: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape != tuple(x.shape):  # not traceable: the head must be a leaf
            self.offset = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
            self.shape = tuple(x.shape)
        scale = self.by_shape.setdefault(tuple(x.shape), torch.full((), 0.5, dtype=x.dtype, device=x.device))
        return self.conv(x) * scale + self.offset


class NetWithCachingHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 12, 3, padding=1), nn.ReLU())
        self.head = CachingHead(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_caching_leaf_prunes_and_checks() -> None:
    model = NetWithCachingHead().eval()
    x = torch.randn(2, 3, 8, 8)
    pruned = prune_and_check(model, {**channel_recipe(0.5), "leaf_modules": ["CachingHead"]}, x)
    assert pruned.get_submodule("body.0").out_channels == 8
    for head in (model.head, pruned.head):  # neither keeps a meta tensor
        assert head.offset.device.type != "meta" and all(t.device.type != "meta" for t in head.by_shape.values())
    with torch.no_grad():
        assert pruned(x).shape == (2, 4, 8, 8)


def test_restoring_attributes_undoes_rebinding_adding_and_container_items() -> None:
    head = CachingHead(3)
    before_offset, before_dict = head.offset, head.by_shape
    with restoring_attributes(head):
        head(torch.randn(1, 3, 2, 5, device="meta"))
        head.extra = 1
    assert head.shape is None and head.offset is before_offset and not hasattr(head, "extra")
    assert head.by_shape is before_dict and head.by_shape == {}
    head(torch.randn(1, 3, 2, 5))  # outside: a real call caches as usual
    assert head.shape == (1, 3, 2, 5) and len(head.by_shape) == 1


def test_ultralytics_detect_as_leaf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YOLOv8n built from the package's yaml (no download), ``Detect`` kept whole as a leaf."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    tasks = pytest.importorskip("ultralytics.nn.tasks")

    class Predict(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model._predict_once(x)

    model = Predict(tasks.DetectionModel("yolov8n.yaml", verbose=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = prune_and_check(model, {**channel_recipe(0.3, "flops"), "leaf_modules": ["Detect"]}, x,
                             atol=1e-3, rtol=1e-3)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
