"""Regenerate README's torchvision coverage table: every CNN at sparsity 0.5 and flops 0.5.

Run: ``python bench/coverage_table.py [name-prefix ...] > table.md`` (about 15 minutes on 2 cores). Each row is
checked with the masked == shrunk oracle before it is written; a failure is written as a FAIL row.
"""
from __future__ import annotations

import sys
import time

import torch
import torchvision

from fxprune.testing import prune_and_check
from fxprune.work import count_model, count_work

SIZES = {"inception_v3": 80}


def main(prefixes: list[str]) -> None:
    names = [n for n in torchvision.models.list_models(module=torchvision.models)
             if not n.startswith(("vit_", "swin_", "maxvit_")) and (not prefixes or n.startswith(tuple(prefixes)))]
    out = sys.stdout
    out.write("| model | MACs ratio @ sparsity 0.5 | params ratio @ sparsity 0.5 | MACs ratio @ flops 0.5 "
              "| params ratio @ flops 0.5 | compile + check s (flops) |\n|---|---|---|---|---|---|\n")
    for name in names:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        size = SIZES.get(name, 64)
        x = torch.randn(2, 3, size, size)
        base = count_work(model, x)
        cells = []
        for target in ("sparsity", "flops"):
            t0 = time.perf_counter()
            try:
                pruned = prune_and_check(model, {"stages": [{"target": {target: 0.5}}]}, x, atol=1e-3, rtol=1e-3)
            except Exception as exc:  # a row per failure, never a silent gap
                cells += [f"FAIL {type(exc).__name__}", "", ""]
                continue
            seconds = time.perf_counter() - t0
            c = count_model(pruned)
            cells += [f"{c['macs'] / base['macs']:.3f}", f"{c['params'] / base['params']:.3f}", f"{seconds:.1f}"]
        out.write(f"| {name} | {cells[0]} | {cells[1]} | {cells[3]} | {cells[4]} | {cells[5]} |\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
