"""README's Hugging Face transformers coverage table: vision models from their default configs (reduced depth,
width and input; ``bench/hf_models.py``), whole model at ``flops: 0.3``, keyword inputs ``{"pixel_values": x}``.

Run: ``python bench/hf_coverage.py [name ...] > hf.md``. Each row is checked with the masked == shrunk oracle before
it is written; a failure is written as a FAIL row with the error's first line (never a silent gap).
Random weights, eager attention, nothing downloaded.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import build, names

import fxprune
from fxprune.testing import channel_recipe, prune_and_check

log = logging.getLogger("hf_coverage")


def row(name: str) -> str:
    start = time.perf_counter()
    try:
        model, inputs = build(name)
        side = next(iter(inputs.values())).shape[-1]
        pruned = prune_and_check(model, channel_recipe(0.3, "flops"), inputs)
        seconds = time.perf_counter() - start
        report = fxprune.report(model, pruned, inputs)
        leaves = sum(c.startswith("auto leaf") for c in report.capture)
        note = f" ({leaves} auto leaves)" if leaves else ""
        return (f"| {name} | {side}×{side} | {report.macs_ratio:.3f} | {report.params_ratio:.3f} | "
                f"{seconds:.1f}{note} |")
    except Exception as exc:  # a failing model is a FAIL row, not a crash of the table
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"| {name} | | FAIL | {type(exc).__name__}: {first[:160]} | |"


def main(selected: list[str]) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    out = sys.stdout
    out.write("| model | input | MACs ratio | params ratio | compile + check s |\n|---|---|---|---|---|\n")
    for name in selected or names():
        out.write(row(name) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
