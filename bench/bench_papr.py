"""CPU end-to-end latency of PaPr patch pruning: ViT-B/16 at 224, keep z = 0.5, proposal net included, vs dense.

Run as a script (prints a markdown table): ``python bench/bench_papr.py [--runs 9] [--threads 1 2]
[--batches 1 8 16]``; or under pytest-benchmark: ``pytest bench/bench_papr.py --benchmark-only -q -s``. The dense
and pruned models are timed alternately in one process; the speed-up is given from the minima (timeit's convention)
and from the medians, as latency at batch 1 and as images/s (the paper's measure) at larger batches. MACs are
counted with ``fxprune.work.count_work``, the proposal's included. A last column times the encoder blocks alone on
the kept vs all tokens: the ceiling set by how the GEMMs scale with token rows, which no token-dropping method passes.
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
from timing import interleaved_ms

log = logging.getLogger(__name__)
PROPOSAL = "torchvision:mobilenet_v3_small"


def build(z: float = 0.5, size: int = 224, name: str = "vit_b_16") -> tuple[torch.nn.Module, torch.nn.Module]:
    """A dense torchvision model and its PaPr version (the default MobileNetV3-small proposal, random weights).

    ViTs drop tokens; hierarchical models (``swin_t``, ``convnext_tiny``) run their MLPs on kept positions only."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    recipe = {"stages": [{"kind": "patches", "keep": z, "proposal": PROPOSAL}]}
    return model, fxprune.compile(model, recipe, example_inputs=torch.randn(1, 3, size, size))


def ceiling(model: torch.nn.Module, batch: int, tokens: int, kept: int, runs: int) -> float | None:
    """How much faster the encoder blocks alone run on ``kept`` than on ``tokens`` tokens (random activations): the
    speed-up any token-dropping method can reach with the same GEMMs. ``None`` for models without
    ``encoder.layers`` (torchvision ViTs have them)."""
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if layers is None:
        return None
    width = model.hidden_dim
    full, short = torch.randn(batch, tokens, width), torch.randn(batch, kept, width)
    t = interleaved_ms({"full": lambda: layers(full), "kept": lambda: layers(short)}, runs)
    return min(t["full"]) / min(t["kept"])


def measure(model: torch.nn.Module, pruned: torch.nn.Module, batch: int, runs: int, size: int = 224,
            name: str = "vit_b_16", z: float = 0.5) -> dict:
    """Dense and PaPr wall times at ``batch`` from ``runs`` interleaved rounds: speed-up of the minima (timeit's
    convention: the least disturbed run) and of the medians, images/s, MACs, and the encoder's token-count ceiling."""
    x = torch.randn(batch, 3, size, size)
    t = interleaved_ms({"dense": lambda: model(x), "papr": lambda: pruned(x)}, runs)
    d_min, p_min = min(t["dense"]), min(t["papr"])
    d_med, p_med = statistics.median(t["dense"]), statistics.median(t["papr"])
    macs_d, macs_p = count_work(model, x[:1])["macs"], count_work(pruned, x[:1])["macs"]
    tokens = (size // 16) ** 2 + 1
    return {"model": name, "z": z, "batch": batch, "runs": runs, "threads": torch.get_num_threads(),
            "dense_ms": d_min, "papr_ms": p_min, "speedup": d_min / p_min, "speedup_median": d_med / p_med,
            "dense_img_s": batch * 1e3 / d_min, "papr_img_s": batch * 1e3 / p_min, "macs_ratio": macs_d / macs_p,
            "ceiling": ceiling(model, batch, tokens, int(tokens * z), max(3, runs // 2))}


def table(rows: list[dict]) -> str:
    lines = ["| model | z | batch | threads | dense ms | PaPr ms (incl. proposal) | dense img/s | PaPr img/s | "
             "speed-up (min / median) | encoder alone at kept tokens | MACs ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ceil = f"{r['ceiling']:.2f}x" if r["ceiling"] else "-"
        lines.append(f"| {r['model']} @224 | {r['z']} | {r['batch']} | {r['threads']} | {r['dense_ms']:.1f} | "
                     f"{r['papr_ms']:.1f} | {r['dense_img_s']:.2f} | {r['papr_img_s']:.2f} | "
                     f"{r['speedup']:.2f}x / {r['speedup_median']:.2f}x | {ceil} | {r['macs_ratio']:.2f}x |")
    return "\n".join(lines) + f"\n\n(torch {torch.__version__}, CPU; proposal {PROPOSAL}; minima of interleaved runs)"


@pytest.mark.parametrize("batch", [1, 8])
def test_papr_vit_b16_latency(benchmark, batch: int) -> None:
    model, pruned = build()
    runs = 3 if batch == 1 else 2
    row = measure(model, pruned, batch, runs)
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():  # the benchmark's own timing: the PaPr model, proposal included
        benchmark.pedantic(pruned, args=(x,), rounds=runs, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(row)
    print("\n" + table([row]))
    assert row["macs_ratio"] > 1.5  # half the tokens: the MACs really went down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b_16"],
                        help="torchvision models, e.g. vit_b_16 swin_t convnext_tiny")
    parser.add_argument("--keep", type=float, nargs="+", default=None,
                        help="one z per model (default 0.5 for ViTs, 0.65 for hierarchical models, as in the paper)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = []
    for i, name in enumerate(args.models):
        z = args.keep[i] if args.keep else (0.5 if name.startswith("vit") else 0.65)
        model, pruned = build(z, name=name)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for b in args.batches:
                rows.append(measure(model, pruned, b, args.runs if b == 1 else max(3, args.runs // 3), name=name, z=z))
                log.info("%s", rows[-1])
    print(table(rows))


if __name__ == "__main__":
    main()
