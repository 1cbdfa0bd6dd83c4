"""Accuracy of the ``blocksparse`` block criteria on real data: scikit-learn's digits with a small ViT.

Run: ``python bench/bench_blocksparse_digits.py`` (one CPU thread, about a minute). Prints a markdown table.

Trains ``DigitsViT`` (``bench/digits.py``: two blocks, dim 64, Linear q/k/v/proj and a 4x MLP) on the train split,
then prunes 50% / 75% / 90% of the 16x16 blocks of every linear layer but the head (``sparsity`` target) with
``lpvit`` (calibrated on 200 unlabeled train images), ``dimap`` and ``l2``, and reports test accuracy without
fine-tuning and after one epoch of fine-tuning the kept blocks (``BlockSparseLinear.values`` get the gradients).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsViT, accuracy, digits, finetuned, train

import fxprune
from fxprune.work import count_model

CRITERIA = ("lpvit", "dimap", "l2")
SPARSITIES = (0.5, 0.75, 0.9)


def prune(model: torch.nn.Module, criterion: str, sparsity: float, x: torch.Tensor,
          calib: list[torch.Tensor]) -> torch.nn.Module:
    recipe = {"stages": [{"kind": "blocksparse", "target": {"sparsity": sparsity}, "block": [16, 16],
                          "criterion": criterion, "max_sparsity": 0.95}]}
    return fxprune.compile(model, recipe, example_inputs=x, data=calib)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tr, _, te = digits()
    model = train(DigitsViT(), tr, 40, 2e-3)
    base = accuracy(model, te)
    calib = [tr.x[i:i + 20] for i in range(0, 200, 20)]
    x = te.x[:2]
    gm = fxprune.trace(model)
    fxprune.record_shapes(gm, (x,))
    base_macs = count_model(gm)["macs"]
    print(f"DigitsViT unpruned: test accuracy {100 * base:.1f}%\n")
    print("| criterion | block sparsity (16x16) | model MACs removed | test acc., no fine-tune | "
          "after 1 epoch fine-tune |")
    print("|---|---|---|---|---|")
    for sparsity in SPARSITIES:
        for criterion in CRITERIA:
            pruned = prune(model, criterion, sparsity, x, calib)
            removed = 1 - pruned.fxprune_plan.stats["blocksparse_macs_after"] / base_macs
            acc = accuracy(pruned, te)
            tuned = accuracy(finetuned(pruned, tr, epochs=1, lr=1e-3), te)
            print(f"| {criterion} | {sparsity} | {100 * removed:.1f}% | {100 * acc:.1f}% | {100 * tuned:.1f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
