"""Accuracy study of every criterion on scikit-learn's digits, plus the iterative stage (issue 4) and training-free
recovery (issue 17).

Run: ``python bench/bench_criteria_digits.py [--part all|criteria|recover]`` (one CPU thread, a few minutes per
part). Prints markdown tables to stdout.

1. Trains ``DigitsCNN`` (residual + concat) and ``DigitsViT`` (Linear attention + MLP blocks) on the train split.
2. For every criterion, prunes 30% / 50% of the channel units (``sparsity``, local scope) and 15% / 30% / 50% of the
   MACs (``flops``), and reports test accuracy with no fine-tuning and after one epoch of fine-tuning.
   ``dimap`` runs with ``scope: module`` (its module families below); every other criterion with local scope.
   ``random`` is the mean over three seeds. Data-driven criteria get 10 labeled train images per class.
3. Runs the ``iterative`` stage on the CNN (FLOPs target 0.6, validation accuracy as ``evaluate``, two epochs of
   fine-tuning per step) and compares it with one-shot ``l2`` at the same MACs and the same fine-tuning epochs.
4. Recovery (``--part recover``): every criterion x ``recover`` in {none, bn, bn+bias, bn+bias+lstsq} (default
   lstsq options) at channels -30% / -50% and FLOPs -30% / -50%, with no fine-tuning and after one epoch, on the
   same 100 calibration images as the criteria.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsCNN, DigitsViT, Split, accuracy, calibration, digits, finetuned, train

import fxprune
from fxprune.errors import BudgetError
from fxprune.work import count_model

log = logging.getLogger("bench.digits")

CRITERIA = ["l1", "l2", "bn_scale", "random", "taylor", "hessian", "lamp", "dimap", "catro"]
TARGETS = [("sparsity", 0.3), ("sparsity", 0.5), ("flops", 0.15), ("flops", 0.3), ("flops", 0.5)]
FAMILIES = {  # DIMAP module families (scope "module")
    "cnn": {"conv3x3": ["stem.0", "body.*", "fuse.0", "head.0"], "conv1x1": ["side.0"]},
    "vit": {"qkv": ["*.q", "*.k", "*.v"], "proj": ["*.proj"], "mlp": ["*.fc1", "*.fc2"]},
}
FT_LR = 1e-3


def macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    gm = fxprune.trace(copy.deepcopy(model))
    fxprune.record_shapes(gm, (x,))
    return count_model(gm)["macs"]


RECOVERIES = [("none", []), ("bn", ["bn"]), ("bn+bias", ["bn", "bias"]), ("bn+bias+lstsq", ["bn", "bias", "lstsq"])]
RECOVERY_TARGETS = [("sparsity", 0.3), ("sparsity", 0.5), ("flops", 0.3), ("flops", 0.5)]


def stage(criterion: str, kind: str, value: float, family: dict, seed: int = 0, recover: list | None = None) -> dict:
    s = {"kind": "channels", "target": {kind: value}, "criterion": criterion, "seed": seed, "recover": recover or []}
    if criterion == "dimap":
        s.update(scope="module", modules=family)
    return {"stages": [s]}


def sweep(name: str, model: torch.nn.Module, tr: Split, te: Split, calib: list) -> list[str]:
    x = tr.x[:2]
    base_macs = macs(model, x)
    cells: dict[tuple[str, str, float], str] = {}
    reductions: dict[tuple[str, float], list[float]] = {}
    for crit in CRITERIA:
        for kind, value in TARGETS:
            seeds = [0, 1, 2] if crit == "random" else [0]
            raw, tuned = [], []
            try:
                for seed in seeds:
                    pruned = fxprune.compile(model, stage(crit, kind, value, FAMILIES[name], seed), example_inputs=x,
                                             data=calib)
                    raw.append(accuracy(pruned, te))
                    tuned.append(accuracy(finetuned(pruned, tr, 1, FT_LR, seed=seed), te))
                    reductions.setdefault((kind, value), []).append(1 - macs(pruned, x) / base_macs)
            except BudgetError as exc:
                log.warning("%s %s %s=%s: %s", name, crit, kind, value, exc)
                cells[(crit, kind, value)] = "n/a"
                continue
            cells[(crit, kind, value)] = f"{100 * np.mean(raw):.1f} / {100 * np.mean(tuned):.1f}"
        log.info("%s: %s done", name, crit)
    head = " | ".join(f"{'channels' if k == 'sparsity' else 'FLOPs'} -{int(v * 100)}%" for k, v in TARGETS)
    lines = [f"| criterion | {head} |", "|---|" + "---|" * len(TARGETS)]
    for crit in CRITERIA:
        lines.append(f"| {crit}{' (module)' if crit == 'dimap' else ''} | "
                     + " | ".join(cells[(crit, k, v)] for k, v in TARGETS) + " |")
    span = " · ".join(f"{'channels' if k == 'sparsity' else 'FLOPs'} -{int(v * 100)}%: MACs "
                      f"-{100 * min(r):.0f}..{100 * max(r):.0f}%" for (k, v), r in reductions.items())
    lines.append(f"\nMeasured MAC reductions across criteria: {span}")
    return lines


def _target_name(kind: str, value: float) -> str:
    return f"{'channels' if kind == 'sparsity' else 'FLOPs'} -{int(value * 100)}%"


def recovery_sweep(name: str, model: torch.nn.Module, tr: Split, te: Split, calib: list) -> list[str]:
    """One table per target: criterion x recovery, cells "no fine-tune / after 1 epoch" (test accuracy %)."""
    x = tr.x[:2]
    out: list[str] = []
    seconds: dict[str, list[float]] = {r: [] for r, _ in RECOVERIES}
    for kind, value in RECOVERY_TARGETS:
        lines = [f"{name} at {_target_name(kind, value)}:", "",
                 "| criterion | " + " | ".join(r for r, _ in RECOVERIES) + " |", "|---|" + "---|" * len(RECOVERIES)]
        for crit in CRITERIA:
            cells = []
            for rname, rec in RECOVERIES:
                raw, tuned = [], []
                try:
                    for seed in ([0, 1, 2] if crit == "random" else [0]):
                        t0 = time.perf_counter()
                        pruned = fxprune.compile(model, stage(crit, kind, value, FAMILIES[name], seed, rec),
                                                 example_inputs=x, data=calib)
                        seconds[rname].append(time.perf_counter() - t0)
                        raw.append(accuracy(pruned, te))
                        tuned.append(accuracy(finetuned(pruned, tr, 1, FT_LR, seed=seed), te))
                except BudgetError as exc:
                    log.warning("%s %s %s=%s: %s", name, crit, kind, value, exc)
                    cells.append("n/a")
                    continue
                cells.append(f"{100 * np.mean(raw):.1f} / {100 * np.mean(tuned):.1f}")
            lines.append(f"| {crit}{' (module)' if crit == 'dimap' else ''} | " + " | ".join(cells) + " |")
        out += lines + [""]
        log.info("%s recovery at %s=%s done", name, kind, value)
    out.append("Median compile time (prune + recover) per setting: " + ", ".join(
        f"{r} {np.median(t):.2f} s" for r, t in seconds.items()))
    return out


def iterative_study(model: torch.nn.Module, tr: Split, va: Split, te: Split) -> list[str]:
    x = tr.x[:2]
    base_acc, base_macs = accuracy(model, te), macs(model, x)
    epochs_per_step = 2
    steps: list[int] = []

    def finetune(m: torch.nn.Module, step: int) -> None:
        steps.append(step)
        train(m, tr, epochs_per_step, FT_LR, seed=step)

    recipe = {"stages": [{"kind": "iterative", "target": {"flops": 0.6}, "criterion": "l2", "rates": [0.25, 0.5, 0.75],
                          "alpha": 20, "alpha_decay": 1, "layers_per_step": 2, "steps": 10}]}
    t0 = time.perf_counter()
    pruned = fxprune.compile(model, recipe, example_inputs=x, evaluate=lambda m: accuracy(m, va), finetune=finetune)
    seconds = time.perf_counter() - t0
    red = 1 - macs(pruned, x) / base_macs
    it_acc = accuracy(pruned, te)
    epochs = epochs_per_step * len(steps)
    oneshot = fxprune.compile(model, {"stages": [{"target": {"flops": round(red, 4)}, "criterion": "l2"}]},
                              example_inputs=x)
    os_red = 1 - macs(oneshot, x) / base_macs
    os_raw = accuracy(oneshot, te)
    os_acc = accuracy(finetuned(oneshot, tr, epochs, FT_LR), te)
    return [
        "| run | MACs removed | steps | fine-tune epochs | test acc. | change vs unpruned |",
        "|---|---|---|---|---|---|",
        f"| unpruned DigitsCNN | 0% | - | - | {100 * base_acc:.1f} | - |",
        f"| iterative (l2 order, target FLOPs 0.6) | {100 * red:.1f}% | {len(steps)} | {epochs} | {100 * it_acc:.1f} "
        f"| {100 * (it_acc - base_acc):+.1f} |",
        f"| one-shot l2, same MACs, no fine-tune | {100 * os_red:.1f}% | 1 | 0 | {100 * os_raw:.1f} "
        f"| {100 * (os_raw - base_acc):+.1f} |",
        f"| one-shot l2, same MACs, same epochs | {100 * os_red:.1f}% | 1 | {epochs} | {100 * os_acc:.1f} "
        f"| {100 * (os_acc - base_acc):+.1f} |",
        f"\nIterative stage wall time: {seconds:.0f} s (sweep evaluations on the validation split + fine-tuning). "
        f"Final widths: " + ", ".join(f"{n} {m.out_channels}" for n, m in pruned.named_modules()
                                        if isinstance(m, torch.nn.Conv2d)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "criteria", "recover"], default="all")
    part = parser.parse_args().part
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("fxprune").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    tr, va, te = digits(0)
    calib = calibration(tr, per_class=10, batch=10)
    out = ["# fxprune criteria on digits (test accuracy %, no fine-tune / after 1 epoch fine-tune)", ""]
    models = {}
    for name, cls, epochs, lr in (("cnn", DigitsCNN, 8, 3e-3), ("vit", DigitsViT, 40, 2e-3)):
        torch.manual_seed(0)
        model = train(cls(), tr, epochs, lr, weight_decay=1e-4)
        models[name] = model
        out += [f"## {cls.__name__}: unpruned test accuracy {100 * accuracy(model, te):.1f}%, "
                f"{macs(model, tr.x[:1]) / 1e6:.2f} M MACs/image", ""]
        if part in ("all", "criteria"):
            out += sweep(name, model, tr, te, calib) + [""]
        if part in ("all", "recover"):
            out += ["### Recovery (recover: none / bn / bn+bias / bn+bias+lstsq)", ""]
            out += recovery_sweep(name, model, tr, te, calib) + [""]
        log.info("%s done at %.0f s", name, time.perf_counter() - t0)
    if part in ("all", "criteria"):
        out += ["## Iterative stage (arXiv 2405.03715) on DigitsCNN", ""] + iterative_study(models["cnn"], tr, va, te)
    out += ["", f"Total wall time: {time.perf_counter() - t0:.0f} s on 1 thread."]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
