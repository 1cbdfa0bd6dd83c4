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
from collections.abc import Collection, Sequence

import numpy as np
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
            warmup: int = 1, max_repeats: int = 15, max_s: float = 1.5) -> dict[str, float]:
    """Median milliseconds of each node of ``names`` over ``repeats`` forward passes of ``gm`` on ``inputs`` (after
    ``warmup`` passes), in inference mode, and more passes, up to ``max_repeats``, while the timed ones took under
    ``max_s`` seconds. Each includes the interpreter's per-node overhead.

    On resnet50 at batch 1 (2 threads) four weighings from 5 passes put its layers at 40.3-44.9 ms, from 15 at
    39.6-40.4 ms, and the plans of one latency target from them overlapped by 0.91-0.95 (Jaccard) against
    0.94-0.98."""
    timer = _NodeTimer(gm, names, _device(inputs))
    with torch.inference_mode():
        for _ in range(warmup):
            timer.run(*inputs)
        timer.ms.clear()
        start, done = time.perf_counter(), 0
        while done < repeats or (done < max_repeats and time.perf_counter() - start < max_s):
            timer.run(*inputs)
            done += 1
    return {k: statistics.median(v) for k, v in timer.ms.items()}


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """What a node runs: its module's class, or its function's or method's name (nodes of one kind share a cost
    per call and per element)."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))


def element_rates(timed: Sequence[tuple[str, str, int, float]], floor: float) -> dict[str, float]:
    """Milliseconds per output element of each ``(name, kind, elements, ms)`` node timed in the model.

    The nodes of a kind with at least three distinct sizes share the slope of the least-squares line through their
    times (what an element costs; the intercept is the kind's cost per call, which does not shrink with the widths).
    Other nodes, and kinds whose line does not rise or lies below ``floor`` (the per-node overhead every node pays)
    at no elements, cost their time above ``floor`` per element."""
    rates = {name: max(0.0, ms - floor) / elements for name, _, elements, ms in timed}
    kinds: dict[str, list[tuple[str, int, float]]] = {}
    for name, kind, elements, ms in timed:
        kinds.setdefault(kind, []).append((name, elements, ms))
    for items in kinds.values():
        sizes = np.array([e for _, e, _ in items], np.float64)
        if len(set(sizes.tolist())) < 3:
            continue
        times = np.array([ms for _, _, ms in items], np.float64)
        per_call, per_element = np.linalg.lstsq(np.stack([np.ones_like(sizes), sizes], 1), times, rcond=None)[0]
        if per_element > 0 and per_call >= floor:
            rates.update({name: float(per_element) for name, _, _ in items})
    return rates


__all__ = ["element_rates", "node_kind", "node_ms"]
