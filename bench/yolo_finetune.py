"""Dense vs pruned YOLOv8n trained with Ultralytics' own trainer on a synthetic dataset (offline, CPU).

Run: ``python bench/yolo_finetune.py`` (defaults: 300 train / 50 val images of 128 px, 30 dense epochs, 20 fine-tune
epochs; ``--help`` for the options). The workflow is the one of ``tests/models/test_ultralytics_workflow.py``:

1. ``YOLO("yolov8n.yaml")`` (random weights) trains for ``--epochs`` epochs: the dense baseline.
2. The trained model is pruned in module mode at ``flops: 0.5`` at 320 px (``fxprune.compile(..., output="module")``),
   put back on a ``YOLO`` object and validated as it is (no fine-tuning).
3. It is fine-tuned for ``--finetune-epochs`` epochs with Ultralytics' trainer (``trainer=example.trainer_for(model)``).

Both trainings go through :func:`fxprune.examples.yolo.trainer_for`, so both keep the yaml's 80-class head.
Latency: the Conv+BN-fused dense and pruned models at ``--latency-size`` px, batch 1, timed alternately
(``bench/timing.py``, ``interleaved_ms``). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fxprune.examples import yolo as example

example.offline_environment()  # before Ultralytics is imported

import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402

import fxprune  # noqa: E402
from fxprune.work import count_work  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_ms  # noqa: E402

log = logging.getLogger("bench.yolo_finetune")
RECIPE = {"stages": [{"target": {"flops": 0.5}}]}


def train(model: torch.nn.Module, data: Path, work: Path, name: str, epochs: int, args: argparse.Namespace) -> YOLO:
    """``model`` trained by Ultralytics' trainer for ``epochs`` epochs; returns the ``YOLO`` object holding it."""
    yolo = YOLO("yolov8n.yaml")
    yolo.model = model
    yolo.train(trainer=example.trainer_for(model), data=str(data), epochs=epochs, imgsz=args.imgsz, batch=args.batch,
               project=str(work), name=name, seed=0, **example.OFFLINE_TRAIN_ARGS)
    return yolo


def validate(yolo: YOLO, data: Path, work: Path, args: argparse.Namespace) -> float:
    metrics = yolo.val(data=str(data), imgsz=args.imgsz, batch=args.batch, device="cpu", plots=False,
                       project=str(work), name="val", verbose=False)
    return float(metrics.box.map50)


def fused(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).float().eval().fuse(verbose=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--val", type=int, default=50)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--latency-size", type=int, default=640)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    example.install_font()
    work = Path(tempfile.mkdtemp(prefix="fxprune-yolo-bench-"))
    data = example.write_shapes_dataset(work / "shapes", train=args.train, val=args.val, size=args.imgsz)
    torch.manual_seed(0)

    t = time.perf_counter()
    dense_yolo = train(YOLO("yolov8n.yaml").model, data, work, "dense", args.epochs, args)
    dense_time = time.perf_counter() - t
    dense_map = validate(dense_yolo, data, work, args)
    dense = dense_yolo.model.float().eval()

    t = time.perf_counter()
    pruned = fxprune.compile(dense, RECIPE, example_inputs=torch.rand(1, 3, 320, 320), output="module")
    prune_time = time.perf_counter() - t
    pruned_yolo = YOLO("yolov8n.yaml")
    pruned_yolo.model = pruned
    pruned_map0 = validate(pruned_yolo, data, work, args)
    t = time.perf_counter()
    tuned_yolo = train(pruned, data, work, "pruned", args.finetune_epochs, args)
    tune_time = time.perf_counter() - t
    tuned_map = validate(tuned_yolo, data, work, args)
    tuned = tuned_yolo.model.float().eval()

    x = torch.rand(1, 3, args.latency_size, args.latency_size)
    models = {"dense": fused(dense), "pruned": fused(tuned)}
    load = os.getloadavg()[0]
    times = interleaved_ms({k: (lambda m=m: m(x)) for k, m in models.items()}, args.runs)
    ms = {k: statistics.median(times[k]) for k in models}
    work_of = {k: count_work(m, x) for k, m in models.items()}
    params = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    print(f"\n{args.train} train / {args.val} val images of {args.imgsz} px, batch {args.batch}, "
          f"{args.threads} threads, load average {load:.1f} before timing; latency at {args.latency_size} px, "
          f"batch 1, median of {args.runs} interleaved runs (fused Conv+BN); prune {prune_time:.1f} s\n")
    print("| model | epochs | train time | mAP50 | GFLOPs | params | latency | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| dense yolov8n | {args.epochs} | {dense_time:.0f} s | {dense_map:.3f} | "
          f"{2 * work_of['dense']['macs'] / 1e9:.2f} | {params['dense'] / 1e6:.2f} M | {ms['dense']:.1f} ms | 1.00x |")
    print(f"| pruned, flops 0.5, before fine-tuning | - | - | {pruned_map0:.3f} | | | | |")
    print(f"| pruned, flops 0.5, fine-tuned | +{args.finetune_epochs} | {tune_time:.0f} s | {tuned_map:.3f} | "
          f"{2 * work_of['pruned']['macs'] / 1e9:.2f} | {params['pruned'] / 1e6:.2f} M | {ms['pruned']:.1f} ms | "
          f"{ms['dense'] / ms['pruned']:.2f}x |")


if __name__ == "__main__":
    main()
