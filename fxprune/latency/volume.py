"""In-model milliseconds of single nodes of a graph: what the latency table's entries are weighed by.

Memory-bound nodes differ widely in what an output element costs (on a 2-core CPU at batch 1, resnet50's stem
max-pool took 1.6e-5 ms per element, its BatchNorms 6.7e-7 and its ReLUs 3.0e-7), so one fitted cost per element
misjudges which channels are expensive; and a layer inside the model can take more or less than timed on its own
(the table's grid): resnet50's convolutions at batch 1 took 0.85-1.03x their time alone, mobilenet_v3_large's at
batch 8 0.58-1.08x (10th to 90th percentile). ``node_ms`` times the nodes where they run, inside a whole forward
pass (an ``fx.Interpreter``), so their inputs come from the layer before as they do in the model.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Collection

import torch
import torch.fx as fx

from .cache import _device, _sync


class _NodeTimer(fx.Interpreter):
    """Runs the graph and notes the milliseconds of the nodes in ``names``."""

    def __init__(self, gm: fx.GraphModule, names: Collection[str], device: torch.device) -> None:
        super().__init__(gm)
        self.names = set(names)
        self.sync = _sync(device)
        self.ms: dict[str, list[float]] = {}

    def run_node(self, n: fx.Node):  # type: ignore[no-untyped-def]
        if n.name not in self.names:
            return super().run_node(n)
        self.sync()
        start = time.perf_counter()
        out = super().run_node(n)
        self.sync()
        self.ms.setdefault(n.name, []).append((time.perf_counter() - start) * 1e3)
        return out


def node_ms(gm: fx.GraphModule, inputs: tuple, names: Collection[str], repeats: int = 5,
            warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each node of ``names`` over ``repeats`` forward passes of ``gm`` on ``inputs`` (after
    ``warmup`` passes), in inference mode. Each includes the interpreter's per-node overhead."""
    timer = _NodeTimer(gm, names, _device(inputs))
    with torch.inference_mode():
        for _ in range(warmup):
            timer.run(*inputs)
        timer.ms.clear()
        for _ in range(repeats):
            timer.run(*inputs)
    return {k: statistics.median(v) for k, v in timer.ms.items()}


__all__ = ["node_ms"]
