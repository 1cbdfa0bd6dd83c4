"""Prune an Ultralytics YOLO detector in module mode and fine-tune it with Ultralytics' own trainer, offline.

``python -m fxprune.examples.yolo`` writes a small synthetic detection dataset (coloured rectangles, two classes, YOLO
format), prunes ``YOLO("yolov8n.yaml").model`` to half its FLOPs, puts it back on the ``YOLO`` object, trains it
for one epoch, validates it and exports it to ONNX. ``tests/models/test_ultralytics_workflow.py`` and
``bench/yolo_finetune.py`` use the same helpers.

The key step is :func:`trainer_for`: ``YOLO.train()`` normally rebuilds the network from ``model.yaml`` (the dense
architecture), so the pruned model is handed to the trainer through Ultralytics' documented extension point, a
``DetectionTrainer`` subclass whose ``get_model`` returns it (``yolo.train(trainer=trainer_for(pruned), ...)``).

Ultralytics is kept off the network: set ``YOLO_OFFLINE=1`` and a temporary ``YOLO_CONFIG_DIR`` before importing it
(:func:`offline_environment`), call :func:`install_font` (its dataset check otherwise sends an HTTP request for
``Arial.ttf`` even offline) and train with ``amp=False`` and ``plots=False`` (:data:`OFFLINE_TRAIN_ARGS`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("fxprune.examples")

CLASSES = ("red", "blue")
_COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}  # RGB
# Arguments every offline CPU run passes to ``YOLO.train``: no AMP check (it would fetch weights), no plots (they
# fetch a font), no dataloader workers, no on-disk image cache.
OFFLINE_TRAIN_ARGS: dict[str, Any] = {"device": "cpu", "amp": False, "plots": False, "workers": 0, "cache": False,
                                      "exist_ok": True, "verbose": False, "deterministic": False, "val": True}


def offline_environment() -> None:
    """Set the environment that keeps Ultralytics offline and out of the user's settings (before importing it):
    ``YOLO_OFFLINE`` (no connectivity checks or downloads), ``YOLO_AUTOINSTALL=False`` (never pip-installs a missing
    export requirement) and a temporary ``YOLO_CONFIG_DIR`` for the settings file it writes on import."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="fxprune-ultralytics-"))


def install_font() -> Path:
    """Put a font at ``USER_CONFIG_DIR/Arial.ttf`` (matplotlib's DejaVu Sans): Ultralytics' dataset check looks
    for that file and, when it is missing, sends an HTTP request for it even with ``YOLO_OFFLINE`` set."""
    import matplotlib
    from ultralytics.utils import USER_CONFIG_DIR

    target = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not target.exists():
        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def _draw(rng: np.random.Generator, size: int, max_boxes: int) -> tuple[np.ndarray, list[str]]:
    """One image (BGR, uint8) of filled rectangles on a noisy grey background and its YOLO label lines."""
    image = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
    lines = []
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        cls = int(rng.integers(len(CLASSES)))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        image[y0:y0 + h, x0:x0 + w] = _COLOURS[CLASSES[cls]][::-1]  # RGB -> BGR
        lines.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
    return image, lines


def write_shapes_dataset(root: str | Path, train: int = 32, val: int = 8, size: int = 128, seed: int = 0,
                         max_boxes: int = 3) -> Path:
    """Write a detection dataset in YOLO format under ``root`` (``images/{train,val}/*.png``,
    ``labels/{train,val}/*.txt``, ``data.yaml``): images of ``size`` px with 1 to ``max_boxes`` filled rectangles,
    whose colour is the class (``CLASSES``). Returns the path of ``data.yaml``."""
    import cv2
    import yaml

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, lines = _draw(rng, size, max_boxes)
            cv2.imwrite(str(root / "images" / split / f"{i:05d}.png"), image)
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": dict(enumerate(CLASSES))}))
    return data


def trainer_for(model: torch.nn.Module) -> type:
    """A ``DetectionTrainer`` subclass whose ``get_model`` returns ``model`` itself (pruned architecture and
    weights), for ``YOLO.train(trainer=...)``: the stock trainer would rebuild the dense network from the yaml."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class GivenModelTrainer(DetectionTrainer):
        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> torch.nn.Module:
            return self.set_model_names_for_load(model)

    return GivenModelTrainer


def main() -> None:
    offline_environment()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ultralytics import YOLO

    import fxprune

    install_font()
    work = Path(tempfile.mkdtemp(prefix="fxprune-yolo-"))
    data = write_shapes_dataset(work / "shapes", train=32, val=8, size=128)
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    recipe = {"stages": [{"target": {"flops": 0.5}}]}
    yolo.model = fxprune.compile(yolo.model.eval(), recipe, example_inputs=torch.rand(1, 3, 320, 320),
                                 output="module")
    yolo.train(trainer=trainer_for(yolo.model), data=str(data), epochs=1, imgsz=128, batch=8, project=str(work),
               name="train", **OFFLINE_TRAIN_ARGS)
    metrics = yolo.val(data=str(data), imgsz=128, batch=8, device="cpu", plots=False, project=str(work), name="val")
    log.info("mAP50 %.4f  mAP50-95 %.4f", metrics.box.map50, metrics.box.map)
    log.info("ONNX: %s", yolo.export(format="onnx", imgsz=320, simplify=False, device="cpu"))


if __name__ == "__main__":
    main()
