"""Latency as the budget: requested vs measured latency, prediction, MACs and efficiency; resnet50 against
Torch-Pruning at the same MACs; DigitsCNN accuracy of a latency plan vs a flops plan at the same latency.

Run (one command; ``--quick`` is a small-scale smoke run, the full run is for a quiet machine)::

    OMP_NUM_THREADS=2 python bench/bench_latency_target.py                 # full: ~15-25 min on 2 cores
    OMP_NUM_THREADS=2 python bench/bench_latency_target.py --quick         # resnet50 b1 t0.3 + the comparisons
    OMP_NUM_THREADS=2 python bench/bench_latency_target.py --skip vs_tp digits --models resnet50   # one model

1. ``targets``: resnet50, mobilenet_v3_large, vit_b_16 (224 px) at batch 1 and 8, 2 threads, ``target: {latency:
   t}`` for t in 0.3 / 0.5 (``channels``, l2, ``round_to: 8``): requested latency ratio, the plan's predicted and
   measured ratios, a fresh interleaved re-measurement against the model (three pooled timings), MACs ratio
   (pruned / dense) and efficiency (speed-up / MACs reduction).
2. ``vs_tp``: resnet50 at batch 1: ``flops: 0.5`` (round_to 8), then a latency target equal to the latency that plan
   measures, then Torch-Pruning (``MetaPruner``, L2 magnitude, round_to 8) bisected to the latency plan's MACs. Its
   MACs jump with its ratio, so the closest plans above and below those MACs are both timed and its latency at
   exactly the latency plan's MACs is interpolated between them. Dense and all pruned models are timed side by
   side (median of per-round ratios, three pooled timings). Torch-Pruning is a bench-only dependency
   (``pip install torch-pruning``); its rows are skipped when it is missing.
3. ``digits``: DigitsCNN trained on sklearn digits; ``flops`` plans at 0.3 / 0.5 / 0.7 and for each a ``latency``
   plan at the same measured latency (the latency target set to what the flops plan measures): test accuracy as
   pruned, after BatchNorm re-estimation (``fxprune.recover.bn``, 100 training images) and after one epoch of
   fine-tuning; all the models' latency ratios timed side by side on the 360 test images (4x the rounds: they are
   small; three timings pooled). Each latency plan is compared with the flops plans' accuracy-latency line (through
   dense) at the latency it measured, interpolated between the two flops plans around it.

The process first keeps big CPU blocks in glibc's heap (``timing.steady_allocator``; ``--default-allocator`` to
skip): with the default, DigitsCNN's megabyte activations pay history-dependent page faults and its timings swing
by a third from one process to the next.

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
from timing import interleaved_ms, steady_allocator

log = logging.getLogger("bench_latency_target")


def _macs(m: torch.nn.Module, x: torch.Tensor) -> int:
    return count_work(m, x[:1])["macs"]


def _ratio(dense: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, runs: int, timings: int = 1) -> float:
    """The median over interleaved rounds of pruned / dense milliseconds in the same round (``timings`` timings of
    ``runs`` rounds, pooled)."""
    return statistics.median(_pooled_ratios({"dense": dense, "pruned": pruned}, x, runs, timings)[1]["pruned"])


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
                compile_s = time.perf_counter() - start
                s = pruned.fxprune_plan.stats
                measured = _ratio(model, pruned, x, runs, timings=3)  # three windows: the machine drifts
                macs = _macs(pruned, x) / _macs(model, x)
                rows.append({"model": name, "batch": batch, "requested": 1 - goal,
                             "predicted": s["latency_predicted_ratio"], "measured_in_plan": s["latency_measured_ratio"],
                             "graph_in_plan": s["latency_graph_ratio"], "reference": s["latency_reference_ratio"],
                             "measured": measured, "macs_ratio": macs, "efficiency": (1 / measured) / (1 / macs),
                             "corrections": int(s["latency_corrections"]), "table_s": s["latency_table_s"],
                             "compile_s": compile_s})
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


def _pooled_ratios(models: dict[str, torch.nn.Module], x: torch.Tensor, runs: int,
                   timings: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each model's milliseconds and per-round ratios to ``models["dense"]``, all timed side by side, pooled over
    ``timings`` interleaved timings of ``runs`` rounds."""
    ms: dict[str, list[float]] = {k: [] for k in models}
    ratios: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(timings):
        t = interleaved_ms({k: (lambda m=m: m(x)) for k, m in models.items()}, runs)
        for k in models:
            ms[k] += t[k]
            ratios[k] += [p / d for d, p in zip(t["dense"], t[k])]
    return ms, ratios


def vs_tp(runs: int, bisect: int, timings: int = 3) -> list[dict]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    flops = fxprune.compile(model, channels({"flops": 0.5}), example_inputs=x)
    r_flops = statistics.median(_ratio(model, flops, x, runs) for _ in range(3))  # the target: steadier over three
    lat = fxprune.compile(model, channels({"latency": round(1 - r_flops, 3)}), example_inputs=x)
    models = {"dense": model, "fxprune flops 0.5": flops, "fxprune latency": lat}
    dense_macs = _macs(model, x)
    goal = _macs(lat, x) / dense_macs
    tried: list[tuple[float, float]] = []  # (MACs ratio, Torch-Pruning's channel ratio)
    try:
        lo, hi = 0.0, 0.9
        for _ in range(bisect):  # TP's channel ratio giving the latency plan's MACs
            mid = (lo + hi) / 2
            got = _macs(_tp_prune(model, x, mid), x) / dense_macs
            log.warning("torch-pruning ratio %.4f: MACs ratio %.4f (goal %.4f)", mid, got, goal)
            tried.append((got, mid))
            lo, hi = (mid, hi) if got > goal else (lo, mid)
    except ImportError:
        log.warning("torch_pruning is not installed: pip install torch-pruning (bench-only); its row is skipped")
    # its MACs jump with the ratio at round_to 8: the closest plans above and below the goal, interpolated between
    above = min((t for t in tried if t[0] >= goal), default=None)
    below = max((t for t in tried if t[0] < goal), default=None)
    for name, t in (("torch-pruning, MACs above", above), ("torch-pruning, MACs below", below)):
        if t is not None:
            models[name] = _tp_prune(model, x, t[1])
    ms, ratios = _pooled_ratios(models, x, runs, timings)
    rows = []
    for k, m in models.items():
        r, macs = statistics.median(ratios[k]), _macs(m, x) / dense_macs
        rows.append({"model": k, "ms": statistics.median(ms[k]), "latency_ratio": r, "speedup": 1 / r,
                     "macs_reduction": 1 / macs, "efficiency": macs / r})
    if above is not None and below is not None:  # Torch-Pruning's latency at exactly the latency plan's MACs
        (r_hi, m_hi), (r_lo, m_lo) = [(statistics.median(ratios[k]), t[0]) for k, t in
                                      (("torch-pruning, MACs above", above), ("torch-pruning, MACs below", below))]
        r = r_lo + (r_hi - r_lo) * (goal - m_lo) / (m_hi - m_lo)
        rows.append({"model": "torch-pruning at the latency plan's MACs (interpolated)", "ms": float("nan"),
                     "latency_ratio": r, "speedup": 1 / r, "macs_reduction": 1 / goal, "efficiency": goal / r})
    return rows


def _on_line(points: list[tuple[float, float]], at: float) -> float | None:
    """The accuracy the line through ``points`` (measured latency ratio, accuracy) gives at latency ``at``, by
    linear interpolation between the two points around it; None outside their span (no extrapolation)."""
    pts = sorted(points)
    for (l0, a0), (l1, a1) in zip(pts, pts[1:]):
        if l0 <= at <= l1:
            return a0 + (a1 - a0) * (at - l0) / (l1 - l0) if l1 > l0 else max(a0, a1)
    return None


def _bn_reestimated(m: torch.nn.Module, calib: list) -> torch.nn.Module:
    from fxprune.recover.bn import reestimate

    out = copy.deepcopy(m)
    reestimate(out, [x for x, _ in calib])
    return out


def digits(epochs: int, runs: int, fractions: tuple[float, ...] = (0.3, 0.5, 0.7),
           line_only: tuple[float, ...] = (0.85,), timings: int = 3, flops_round_to: int | str = 1,
           latency_round_to: int | str = 1) -> list[dict]:
    """Flops plans and latency plans on DigitsCNN, timed side by side; each latency plan's accuracy against the
    flops plans' accuracy-latency line (through dense) at the latency the latency plan measured."""
    from digits import DigitsCNN, accuracy, calibration, finetuned, train
    from digits import digits as load

    tr, _, te = load()
    torch.manual_seed(0)
    model = train(DigitsCNN(), tr, epochs, 3e-3)
    x = te.x  # all 360 test images: at 64 the interpreter's overhead and the noise swamp the layers
    calib = calibration(tr)
    runs *= 4  # small models: more rounds
    plans: dict[str, torch.nn.Module] = {"dense": model}
    for f in fractions:  # each flops plan, and a latency plan asked for the latency that flops plan measures
        flops = fxprune.compile(model, channels({"flops": f}, flops_round_to), example_inputs=x)
        r = _ratio(model, flops, x, runs)
        plans[f"flops {f}"] = flops
        plans[f"latency {1 - r:.3f} (= flops {f})"] = fxprune.compile(
            model, channels({"latency": round(1 - r, 3)}, latency_round_to), example_inputs=x)
    for f in line_only:  # the line's low-latency end, so that the fastest latency plan falls inside it
        plans[f"flops {f}"] = fxprune.compile(model, channels({"flops": f}, flops_round_to), example_inputs=x)
    _, ratios = _pooled_ratios(plans, x, runs, timings)  # all side by side, pooled over a few timings
    rows = []
    for name, m in plans.items():
        rows.append({"plan": name, "measured_latency_ratio": statistics.median(ratios[name]),
                     "macs_ratio": _macs(m, x) / _macs(model, x), "accuracy_pruned": accuracy(m, te),
                     "accuracy_bn": accuracy(_bn_reestimated(m, calib), te) if m is not model else accuracy(m, te),
                     "accuracy_1_epoch": accuracy(finetuned(m, tr, 1), te) if m is not model else accuracy(m, te)})
    line = [r for r in rows if not r["plan"].startswith("latency")]
    for r in rows:
        if r["plan"].startswith("latency"):
            for acc in ("accuracy_pruned", "accuracy_bn", "accuracy_1_epoch"):
                on = _on_line([(q["measured_latency_ratio"], q[acc]) for q in line], r["measured_latency_ratio"])
                r[f"flops_line_{acc[9:]}"] = on if on is not None else "outside"
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
    parser.add_argument("--default-allocator", action="store_true",
                        help="time with glibc's default allocator (page faults on big activations; noisier)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if not args.default_allocator:
        steady_allocator()
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
