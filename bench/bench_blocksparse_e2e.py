"""End-to-end CPU latency of block-sparse vs dense ViTs (LPViT ``blocksparse`` stage, 32x32 blocks).

Each case prunes timm ``deit_tiny_patch16_224`` (224x224, random weights) with ``lpvit`` at a block sparsity of
the linear layers (all but the head; ``lpvit`` spreads it unevenly over layers), then times the dense and the
block-sparse model *alternately* in one process (eager, ``inference_mode``) and reports the median latencies,
their ratio (dense / block-sparse: >= 1 means no slowdown; also the ratio of thread CPU times, steadier on a busy
machine) and the MAC ratios (model and chosen linear layers, dense / pruned).

Run::

    python bench/bench_blocksparse_e2e.py                 # markdown table (1 thread, ~1 min)
    pytest bench/bench_blocksparse_e2e.py --benchmark-only -q -s

On CPU a ``BlockSparseLinear`` in eval mode runs ``F.linear`` on a dense weight cached from its kept blocks, so the
latency matches the dense model (no slowdown) rather than following the MACs; the MAC savings pay off on GPU
(Triton kernel, ``bench/bench_blocksparse.py``). Under CPU contention the ratios are noisy (+-5%).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fxprune
from fxprune.nn import BlockSparseLinear
from fxprune.work import count_work

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_ms

MODEL = "deit_tiny_patch16_224"
BATCHES = (1, 8)
SPARSITIES = (0.5, 0.75)
ROUNDS = {1: 21, 8: 7}


def build(sparsity: float, name: str = MODEL) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The dense model and its ``lpvit`` block-sparse version (calibrated on the example input)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    recipe = {"stages": [{"kind": "blocksparse", "target": {"sparsity": sparsity}, "block": [32, 32],
                          "criterion": "lpvit"}]}
    return model, fxprune.compile(model, recipe, example_inputs=x)


def linear_macs(model: torch.nn.Module, paths: list[str], tokens: int) -> int:
    return sum(tokens * (m.values.numel() if isinstance(m, BlockSparseLinear) else m.weight.numel())
               for m in (model.get_submodule(p) for p in paths))


def measure(model: torch.nn.Module, pruned: torch.nn.Module, batch: int, sparsity: float) -> dict[str, Any]:
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        torch.testing.assert_close(pruned(x[:1]), pruned(x[:1]))
    # every linear layer the stage could prune: all but the head (dense or block-sparse now)
    paths = [n for n, m in pruned.named_modules()
             if isinstance(m, (torch.nn.Linear, BlockSparseLinear)) and n != "head"]
    calls = {"dense": lambda: model(x), "sparse": lambda: pruned(x)}
    t = {k: statistics.median(v) for k, v in interleaved_ms(calls, ROUNDS.get(batch, 5)).items()}
    dense_ms, sparse_ms = t["dense"], t["sparse"]
    one = x[:1]
    return {"model": MODEL, "batch": batch, "sparsity": sparsity,
            "macs_ratio": count_work(model, one)["macs"] / count_work(pruned, one)["macs"],
            "linear_macs_ratio": linear_macs(model, paths, 197) / linear_macs(pruned, paths, 197),
            "dense_ms": dense_ms, "blocksparse_ms": sparse_ms, "speed_ratio": dense_ms / sparse_ms,
            "cpu_ratio": t["dense_cpu"] / t["sparse_cpu"]}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_blocksparse_e2e_latency(benchmark, sparsity: float, batch: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier ratios on a shared machine
    try:
        model, pruned = build(sparsity)
        row = benchmark.pedantic(measure, args=(model, pruned, batch, sparsity), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(row)
    print(f"\n{MODEL} b={batch} s={sparsity}: dense {row['dense_ms']:.1f} ms, block-sparse "
          f"{row['blocksparse_ms']:.1f} ms, ratio {row['speed_ratio']:.2f} (thread CPU time {row['cpu_ratio']:.2f}), "
          f"MACs {row['macs_ratio']:.2f}x fewer")
    assert row["linear_macs_ratio"] > 1.0


def main(argv: list[str]) -> None:
    torch.set_num_threads(int(argv[0]) if argv else 1)
    print(f"CPU, {torch.get_num_threads()} thread(s), eager, inference_mode, medians of interleaved runs\n")
    print("| model | batch | block sparsity | MACs ratio (model) | MACs ratio (linears but head) | dense ms | "
          "block-sparse ms | dense / block-sparse (wall) | dense / block-sparse (thread CPU time) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sparsity in SPARSITIES:
        model, pruned = build(sparsity)
        for batch in BATCHES:
            r = measure(model, pruned, batch, sparsity)
            print(f"| {r['model']} | {r['batch']} | {r['sparsity']} | {r['macs_ratio']:.2f}x | "
                  f"{r['linear_macs_ratio']:.2f}x | {r['dense_ms']:.1f} | {r['blocksparse_ms']:.1f} | "
                  f"{r['speed_ratio']:.2f} | {r['cpu_ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
