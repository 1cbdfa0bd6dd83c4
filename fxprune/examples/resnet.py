"""Prune a torchvision ResNet-18 to half its MACs, check it against the masked original and print a report."""
from __future__ import annotations

import logging

import torch
import torchvision

import fxprune
from fxprune.testing import assert_masked_equals_shrunk

log = logging.getLogger("fxprune.examples")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    recipe = {"stages": [{"kind": "channels", "target": {"flops": 0.5}, "criterion": "l2", "round_to": 8}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x)
    assert_masked_equals_shrunk(model, pruned.fxprune_plan, (x,), pruned, atol=1e-3)
    log.info("%s", fxprune.report(model, pruned, x))
    log.info("masked == shrunk: OK")


if __name__ == "__main__":
    main()
