"""Ultralytics YOLO whole-model pruning from the package's yaml (random weights, 64 px, offline: see conftest):
the Detect head's internal cv2/cv3 stacks prune, its final box/class convs stay (model outputs), C2f/C3k2/SPPF/
Concat couple with no rewrite, and the example-shape anchors are guarded."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("ultralytics")
from ultralytics.nn.tasks import DetectionModel

from fxprune.capture import GuardError
from fxprune.testing import channel_recipe, prune_and_check


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_yolo_whole_model_prunes_head_internals(cfg: str) -> None:
    torch.manual_seed(0)
    model = DetectionModel(cfg, verbose=False).eval()
    x = torch.rand(1, 3, 64, 64)
    pruned = prune_and_check(model, channel_recipe(0.5, "flops"), (x,))
    head = model.model[-1]
    index = len(model.model) - 1
    assert sum(p.numel() for p in pruned.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    for stacks in ("cv2", "cv3"):
        for level in range(head.nl):
            final = f"model.{index}.{stacks}.{level}.2"
            assert pruned.get_submodule(final).out_channels == model.get_submodule(final).out_channels
    finals = {f"model.{index}.{s}.{level}.2" for s in ("cv2", "cv3") for level in range(head.nl)}
    inner = [name for name, m in model.named_modules() if name.startswith(f"model.{index}.cv")
             and isinstance(m, torch.nn.Conv2d) and name not in finals]
    shrunk = [name for name in inner
              if pruned.get_submodule(name).out_channels < model.get_submodule(name).out_channels]
    assert len(shrunk) >= len(inner) // 3, f"head internals pruned: {shrunk} of {inner}"
    with pytest.raises(GuardError, match=r"shape\[2\] = 96"):
        pruned(torch.rand(1, 3, 96, 96))


@pytest.mark.parametrize("cfg", ["yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml", "yolov8n-cls.yaml"])
def test_yolo_task_heads_prune(cfg: str) -> None:
    from ultralytics.nn import tasks

    kind = cfg.split("-")[1].split(".")[0]
    model_cls = {"seg": tasks.SegmentationModel, "pose": tasks.PoseModel, "obb": tasks.OBBModel,
                 "cls": tasks.ClassificationModel}[kind]
    torch.manual_seed(0)
    model = model_cls(cfg, verbose=False).eval()
    pruned = prune_and_check(model, channel_recipe(0.5, "flops"), (torch.rand(1, 3, 64, 64),))
    assert sum(p.numel() for p in pruned.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
