"""CPU end-to-end latency of PaPr patch pruning: ViT-B/16 at 224, keep z = 0.5, proposal net included, vs dense.

Run as a script (prints a markdown table): ``python bench/bench_papr.py [--runs 5] [--threads N]``; or under
pytest-benchmark: ``pytest bench/bench_papr.py --benchmark-only -q -s``. The dense and pruned models are timed
alternately in one process (median of ``runs``); MACs are counted with ``fxprune.work.count_work``, the proposal's
included. Timings under CPU contention are noisy: compare ratios, not milliseconds.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fxprune
from fxprune.work import count_work

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402

log = logging.getLogger(__name__)
PROPOSAL = "torchvision:mobilenet_v3_small"


def build(z: float = 0.5, size: int = 224, name: str = "vit_b_16") -> tuple[torch.nn.Module, torch.nn.Module]:
    """A dense torchvision model and its PaPr version (the default MobileNetV3-small proposal, random weights).

    ViTs drop tokens; hierarchical models (``swin_t``, ``convnext_tiny``) run their MLPs on kept positions only."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    recipe = {"stages": [{"kind": "patches", "keep": z, "proposal": PROPOSAL}]}
    return model, fxprune.compile(model, recipe, example_inputs=torch.randn(1, 3, size, size))


def measure(model: torch.nn.Module, pruned: torch.nn.Module, batch: int, runs: int, size: int = 224,
            name: str = "vit_b_16", z: float = 0.5) -> dict:
    """Dense and pruned latency (alternating, median of ``runs`` each) and MACs at ``batch``."""
    x = torch.randn(batch, 3, size, size)
    dense, fast = [], []
    for _ in range(runs):
        dense.append(median_ms(model, x, 1))
        fast.append(median_ms(pruned, x, 1))
    d_ms, p_ms = statistics.median(dense), statistics.median(fast)
    macs_d, macs_p = count_work(model, x[:1])["macs"], count_work(pruned, x[:1])["macs"]
    return {"model": name, "z": z, "batch": batch, "dense_ms": d_ms, "papr_ms": p_ms, "speedup": d_ms / p_ms,
            "macs_ratio": macs_d / macs_p}


def table(rows: list[dict], threads: int) -> str:
    lines = [f"| model | z | batch | dense ms | PaPr ms (incl. proposal) | speedup | MACs ratio (dense / PaPr) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} @224 | {r['z']} | {r['batch']} | {r['dense_ms']:.1f} | {r['papr_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['macs_ratio']:.2f}x |")
    return "\n".join(lines) + f"\n\n(torch {torch.__version__}, CPU, {threads} thread(s); proposal {PROPOSAL})"


@pytest.mark.parametrize("batch", [1, 8])
def test_papr_vit_b16_latency(benchmark, batch: int) -> None:
    model, pruned = build()
    runs = 3 if batch == 1 else 2
    row = measure(model, pruned, batch, runs)
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():  # the benchmark's own timing: the PaPr model, proposal included
        benchmark.pedantic(pruned, args=(x,), rounds=runs, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(row)
    print("\n" + table([row], torch.get_num_threads()))
    assert row["macs_ratio"] > 1.5  # half the tokens: the MACs really went down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b_16"],
                        help="torchvision models, e.g. vit_b_16 swin_t convnext_tiny")
    parser.add_argument("--keep", type=float, nargs="+", default=None,
                        help="one z per model (default 0.5 for ViTs, 0.65 for hierarchical models, as in the paper)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for i, name in enumerate(args.models):
        z = args.keep[i] if args.keep else (0.5 if name.startswith("vit") else 0.65)
        model, pruned = build(z, name=name)
        rows += [measure(model, pruned, b, args.runs, name=name, z=z) for b in args.batches]
    print(table(rows, args.threads))


if __name__ == "__main__":
    main()
