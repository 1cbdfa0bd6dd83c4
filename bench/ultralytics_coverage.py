"""README's Ultralytics coverage table: every YOLO task model built from the package's yaml (random weights, no
download, offline, settings in a temporary directory), whole model at ``flops: 0.5`` on 64×64 inputs.

Run: ``python bench/ultralytics_coverage.py [cfg.yaml ...] > yolo.md``. Each row is checked with the masked == shrunk
oracle; "head" is the fraction of the Detect head's internal cv2/cv3 convs (all but the final box/class convs)
whose output channels shrank. A failure is written as a FAIL row with the error's first line.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="fxprune-ultralytics-"))

import torch

import fxprune
from fxprune.testing import channel_recipe, prune_and_check

CONFIGS = ["yolov8n.yaml", "yolo11n.yaml", "yolov8n-seg.yaml", "yolo11n-seg.yaml", "yolov8n-pose.yaml",
           "yolo11n-pose.yaml", "yolov8n-obb.yaml", "yolo11n-obb.yaml", "yolov8n-cls.yaml", "yolo11n-cls.yaml",
           "yolov5nu.yaml", "yolov9t.yaml", "yolov10n.yaml", "yolo12n.yaml"]


def model_for(cfg: str) -> torch.nn.Module:
    from ultralytics.nn import tasks

    kind = cfg.rsplit("-", 1)[-1].split(".")[0] if "-" in cfg else "det"
    cls = {"seg": tasks.SegmentationModel, "pose": tasks.PoseModel, "obb": tasks.OBBModel,
           "cls": tasks.ClassificationModel}.get(kind, tasks.DetectionModel)
    torch.manual_seed(0)
    return cls(cfg, verbose=False).eval()


def head_pruned(model: torch.nn.Module, pruned: torch.nn.Module) -> str:
    index = len(model.model) - 1
    head = model.model[-1]
    if not hasattr(head, "cv2") or not hasattr(head, "nl"):
        return "-"
    finals = {f"model.{index}.{s}.{i}.2" for s in ("cv2", "cv3") for i in range(head.nl)}
    inner = [n for n, m in model.named_modules() if n.startswith(f"model.{index}.cv") and
             isinstance(m, torch.nn.Conv2d) and n not in finals]
    shrunk = [n for n in inner if pruned.get_submodule(n).out_channels < model.get_submodule(n).out_channels]
    return f"{len(shrunk)}/{len(inner)}"


def row(cfg: str) -> str:
    start = time.perf_counter()
    try:
        model = model_for(cfg)
        x = torch.rand(1, 3, 64, 64)
        pruned = prune_and_check(model, channel_recipe(0.5, "flops"), (x,))
        seconds = time.perf_counter() - start
        report = fxprune.report(model, pruned, (x,))
        leaves = sum(c.startswith("auto leaf") for c in report.capture)
        return (f"| {cfg} | {type(model).__name__} | {report.macs_ratio:.3f} | {report.params_ratio:.3f} | "
                f"{head_pruned(model, pruned)} | {leaves} | {seconds:.1f} |")
    except Exception as exc:  # a failing model is a FAIL row, not a crash of the table
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"| {cfg} | | FAIL | {type(exc).__name__}: {first[:160]} | | | |"


def main(selected: list[str]) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    out = sys.stdout
    out.write("| yaml | model | MACs ratio | params ratio | head internals shrunk | auto leaves | "
              "compile + check s |\n|---|---|---|---|---|---|---|\n")
    for cfg in selected or CONFIGS:
        out.write(row(cfg) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
