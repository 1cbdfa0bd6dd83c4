"""Latency as the budget: requested vs measured latency, prediction, MACs and efficiency; resnet50 against
Torch-Pruning at the same MACs; DigitsCNN accuracy of a latency plan vs a flops plan at the same latency.

Run (one command; ``--quick`` is a small-scale smoke run, the full run is for a quiet machine)::

    OMP_NUM_THREADS=2 python bench/bench_latency_target.py                 # full: ~15-25 min on 2 cores
    OMP_NUM_THREADS=2 python bench/bench_latency_target.py --quick         # resnet50 b1 t0.3 + the comparisons
    OMP_NUM_THREADS=2 python bench/bench_latency_target.py --skip vs_tp digits --models resnet50   # one model

1. ``targets``: resnet50, mobilenet_v3_large, vit_b_16 (224 px) at batch 1 and 8, 2 threads, ``target: {latency:
   t}`` for t in 0.3 / 0.5 (``channels``, l2, ``round_to: 8``): requested latency ratio, the plan's predicted and
   measured ratios, a fresh interleaved re-measurement, MACs ratio (pruned / dense) and efficiency
   (speed-up / MACs reduction).
2. ``vs_tp``: resnet50 at batch 1: ``flops: 0.5`` (round_to 8), then a latency target equal to the latency that plan
   measures, then Torch-Pruning (``MetaPruner``, L2 magnitude, round_to 8) bisected to the latency plan's MACs;
   dense and all three pruned models timed interleaved in one process. Torch-Pruning is a bench-only dependency
   (``pip install torch-pruning``); the row is skipped when it is missing.
3. ``digits``: DigitsCNN trained on sklearn digits; ``flops`` plans at 0.3 / 0.5 / 0.7 and for each a ``latency``
   plan at the same measured latency (the latency target set to what the flops plan measures): test accuracy as
   pruned and after one epoch of fine-tuning; all the models' latency ratios timed side by side on the 360 test images
   (4x the rounds: they are small).

Timing is noisy on a shared machine: ratios come from interleaved rounds in one process (``timing.py``).
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

import fxprune
from fxprune.work import count_work

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_ms

log = logging.getLogger("bench_latency_target")


def _macs(m: torch.nn.Module, x: torch.Tensor) -> int:
    return count_work(m, x[:1])["macs"]


def _ratio(dense: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """The median over interleaved rounds of pruned / dense milliseconds in the same round."""
    t = interleaved_ms({"d": lambda: dense(x), "p": lambda: pruned(x)}, runs)
    return statistics.median(p / d for d, p in zip(t["d"], t["p"]))


def channels(target: dict, round_to: int | str = 8) -> dict:
    return {"stages": [{"kind": "channels", "target": target, "criterion": "l2", "round_to": round_to}]}


def targets(models: list[str], batches: list[int], goals: list[float], runs: int) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224)
            for goal in goals:
                start = time.perf_counter()
                try:
                    pruned = fxprune.compile(model, channels({"latency": goal}), example_inputs=x)
                except fxprune.errors.BudgetError as exc:  # the table says the target is out of reach: a row
                    log.warning("%s batch %d latency %.2f: %s", name, batch, goal, exc)
                    rows.append({"model": name, "batch": batch, "requested": 1 - goal, "error": str(exc)[:80]})
                    continue
                s = pruned.fxprune_plan.stats
                measured = _ratio(model, pruned, x, runs)
                macs = _macs(pruned, x) / _macs(model, x)
                rows.append({"model": name, "batch": batch, "requested": 1 - goal,
                             "predicted": s["latency_predicted_ratio"], "measured_in_plan": s["latency_measured_ratio"],
                             "measured": measured, "macs_ratio": macs, "efficiency": (1 / measured) / (1 / macs),
                             "corrections": int(s["latency_corrections"]), "table_s": s["latency_table_s"],
                             "compile_s": time.perf_counter() - start})
                log.warning("%s", rows[-1])
    return rows


def _tp_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    ignored = [m.fc] if hasattr(m, "fc") else []
    pruner = tp.pruner.MetaPruner(m, x[:1], importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=ignored, round_to=8)
    pruner.step()
    return m.eval()


def vs_tp(runs: int, bisect: int) -> list[dict]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    flops = fxprune.compile(model, channels({"flops": 0.5}), example_inputs=x)
    r_flops = _ratio(model, flops, x, runs)
    lat = fxprune.compile(model, channels({"latency": round(1 - r_flops, 3)}), example_inputs=x)
    models = {"dense": model, "fxprune flops 0.5": flops, "fxprune latency": lat}
    goal = _macs(lat, x) / _macs(model, x)
    try:
        lo, hi = 0.0, 0.9
        for _ in range(bisect):  # TP's channel ratio giving the latency plan's MACs
            mid = (lo + hi) / 2
            got = _macs(_tp_prune(model, x, mid), x) / _macs(model, x)
            log.warning("torch-pruning ratio %.4f: MACs ratio %.4f (goal %.4f)", mid, got, goal)
            lo, hi = (mid, hi) if got > goal else (lo, mid)
        models["torch-pruning"] = _tp_prune(model, x, (lo + hi) / 2)
    except ImportError:
        log.warning("torch_pruning is not installed: pip install torch-pruning (bench-only); its row is skipped")
    t = interleaved_ms({k: (lambda m=m: m(x)) for k, m in models.items()}, runs)
    dense_ms, dense_macs = statistics.median(t["dense"]), _macs(model, x)
    rows = []
    for k, m in models.items():
        ms, macs = statistics.median(t[k]), _macs(m, x)
        rows.append({"model": k, "ms": ms, "speedup": dense_ms / ms, "macs_reduction": dense_macs / macs,
                     "efficiency": (dense_ms / ms) / (dense_macs / macs)})
    return rows


def digits(epochs: int, runs: int, fractions: tuple[float, ...] = (0.3, 0.5, 0.7)) -> list[dict]:
    from digits import DigitsCNN, accuracy, finetuned, train
    from digits import digits as load

    tr, _, te = load()
    torch.manual_seed(0)
    model = train(DigitsCNN(), tr, epochs, 3e-3)
    x = te.x  # all 360 test images: at 64 the interpreter's overhead and the noise swamp the layers
    runs *= 4  # small models: more rounds
    plans: dict[str, torch.nn.Module] = {"dense": model}
    for f in fractions:  # each flops plan, and a latency plan asked for the latency that flops plan measures
        flops = fxprune.compile(model, channels({"flops": f}, round_to=1), example_inputs=x)
        r = _ratio(model, flops, x, runs)
        plans[f"flops {f}"] = flops
        plans[f"latency {1 - r:.3f} (= flops {f})"] = fxprune.compile(
            model, channels({"latency": round(1 - r, 3)}, round_to=1), example_inputs=x)
    t = interleaved_ms({k: (lambda m=m: m(x)) for k, m in plans.items()}, runs)  # all side by side
    rows = []
    for name, m in plans.items():
        tuned = finetuned(m, tr, 1) if m is not model else m
        rows.append({"plan": name, "measured_latency_ratio": statistics.median(
                         p / d for d, p in zip(t["dense"], t[name])),
                     "macs_ratio": _macs(m, x) / _macs(model, x), "accuracy_pruned": accuracy(m, te),
                     "accuracy_1_epoch": accuracy(tuned, te)})
    return rows


def md(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
            + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet50 at batch 1, target 0.3, fewer runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["targets", "vs_tp", "digits"])
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v3_large", "vit_b_16"],
                        help="torchvision models of the targets part")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    runs = 5 if args.quick else 15
    if "targets" not in args.skip:
        rows = (targets(["resnet50"], [1], [0.3], runs) if args.quick else
                targets(args.models, [1, 8], [0.3, 0.5], runs))
        print("## requested vs measured latency\n\n" + md(rows) + "\n")
    if "vs_tp" not in args.skip:
        print("## resnet50 batch 1 vs Torch-Pruning at the same MACs\n\n" + md(vs_tp(runs, 4 if args.quick else 7))
              + "\n")
    if "digits" not in args.skip:
        print("## DigitsCNN: latency plan vs flops plan at the same measured latency\n\n"
              + md(digits(5 if args.quick else 20, runs)) + "\n")


if __name__ == "__main__":
    main()
