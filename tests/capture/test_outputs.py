"""Structured outputs: dicts, lists, nested tuples and dataclasses come back in the same structure from the pruned
model, and the oracle compares every leaf tensor."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fxprune.capture.outputs import output_structure
from fxprune.testing import channel_recipe, prune_and_check


@dataclasses.dataclass
class DetOutput:
    boxes: torch.Tensor
    scores: torch.Tensor
    extra: tuple | None = None


class MultiOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        b, c = self.box(h), self.cls(h)
        if self.kind == "dict":
            return {"boxes": b, "levels": [c, (b, c)], "none": None}
        if self.kind == "dataclass":
            return DetOutput(b, c, (h.mean(),))
        return b, [c, (b * 2, {"c": c})]


def test_structures_round_trip():
    x = torch.randn(1, 3, 8, 8)
    for kind in ("dict", "dataclass", "nested"):
        model = MultiOut(kind).eval()
        pruned = prune_and_check(model, channel_recipe(0.5), (x,))
        with torch.no_grad():
            want, got = model(x), pruned(x)
        assert type(got) is type(want)
        assert output_structure(got)[0] == output_structure(want)[0], kind
        assert pruned.get_submodule("stem.0").out_channels < 16
