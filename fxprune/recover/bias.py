"""``recover: [bias]``: fold the expected contribution of the removed input channels into each consumer's bias
(torch.ao's bias folding, FLAP's bias compensation, arXiv 2312.11983), adding a bias where the layer had none.

For a consumer with dense weight ``W``, kept outputs ``O`` and removed inputs ``R``, the pruned layer lacks
``W[O, R] · x[R]``; its best constant stand-in is that term's calibration mean, measured on the *dense* model's
input of the layer, i.e. after every elementwise op between the producer and the consumer (a ReLU gives
``E[relu(z)]``, not ``relu(E[z])``):

* Linear: ``Δb = W[O, R] · mean(x[..., R])`` over every sample and token;
* Conv (``groups == 1``): ``Δb`` is the mean over samples and output positions of ``conv(x[:, R], W[O, R])``,
  with the layer's own stride, dilation and padding, so border positions count exactly. By linearity it is
  ``W[O, R]`` contracted with the mean im2col patch of ``x[:, R]``: one padded window sum per kernel tap, so the
  statistics cost a sum over the batch, not a convolution;
* grouped convs are skipped: a removed input channel takes its whole group, so it reaches no kept output.

In a LayerNorm transformer the consumers are the attention output projection (heads removed) and the MLP's second
Linear (hidden units removed); their ``Δb`` flows into the residual stream. Sums are float64 and are summed over
``torch.distributed`` ranks before use.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import distributed
from .capture import input_batches, pad_for_conv, run_watching
from .layers import Consumer

log = logging.getLogger(__name__)


def add_to_bias(m: nn.Module, delta: torch.Tensor) -> None:
    """``m.bias += delta``; a zero bias is created first if ``m`` has none."""
    with torch.no_grad():
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(delta.shape[0], dtype=m.weight.dtype, device=m.weight.device),
                                  requires_grad=m.weight.requires_grad)
        m.bias.add_(delta.to(m.bias.dtype))


def add_missing_biases(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give every Linear / conv of ``module`` that has no bias but whose ``<path>.bias`` is in ``state`` a zero bias
    of that shape (recovery adds biases; ``fxprune.load`` replays the plan on the original architecture, which
    lacks them). Returns the paths changed."""
    own = module.state_dict()
    added = []
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        if name != "bias" or key in own:
            continue
        try:
            m = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is None and value.dim() == 1:
            m.bias = nn.Parameter(torch.zeros(value.shape, dtype=m.weight.dtype, device=m.weight.device),
                                  requires_grad=m.weight.requires_grad)
            added.append(path)
    return added


class BiasCompensation:
    """The bias step's statistics: ``hooks()`` are ``on_input`` callbacks for the dense model (``run_watching``), to
    attach to any dense pass (``lstsq`` shares its first one); ``apply()`` sums them over ranks and writes the
    biases of ``pruned``."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, consumers: list[Consumer]) -> None:
        self.dense, self.pruned = dense, pruned
        self.todo: list[Consumer] = []
        for c in consumers:
            if not len(c.removed_in):
                continue
            if c.kind == "conv" and dense.get_submodule(c.path).groups != 1:
                log.debug("recover bias: %s is a grouped conv; its removed inputs reach no kept output", c.path)
                continue
            self.todo.append(c)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = {c.path: torch.zeros(1, dtype=torch.float64) for c in self.todo}
        self.weights: dict[str, torch.Tensor] = {}
        self.records: list[dict] = []
        for c in self.todo:
            w = dense.get_submodule(c.path).weight.detach()
            out = torch.as_tensor(c.kept_out, device=w.device)
            removed = torch.as_tensor(c.removed_in, device=w.device)
            self.weights[c.path] = w.index_select(0, out).index_select(1, removed)
            shape = (len(c.removed_in),) if c.kind == "linear" else (len(c.removed_in), *w.shape[2:])
            self.sums[c.path] = torch.zeros(shape, dtype=torch.float64, device=w.device)  # conv: patch sums

    @property
    def calls(self) -> dict[str, int]:
        return {c.path: c.calls for c in self.todo}

    def _hook(self, c: Consumer):
        removed = torch.as_tensor(c.removed_in)
        m = self.dense.get_submodule(c.path)
        sums, counts = self.sums[c.path], self.counts[c.path]

        def fn(x: torch.Tensor) -> None:
            if c.kind == "linear":
                xr = x.index_select(x.dim() - 1, removed.to(x.device)).reshape(-1, len(removed))
                sums.add_(xr.sum(0, dtype=torch.float64))
                counts.add_(xr.shape[0])
                return
            # the batch sum first (padding is the same linear map on every sample, so it commutes with the sum)
            xs = x.sum(0).index_select(0, removed.to(x.device)).to(torch.float64)
            xp = pad_for_conv(m, xs[None])[0]  # [R, *padded spatial]
            out = [(xp.shape[1 + i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
                   for i in range(xp.dim() - 1)]
            for tap in itertools.product(*(range(k) for k in m.kernel_size)):  # the window each tap reads
                window = tuple(slice(t * d, t * d + (o - 1) * st + 1, st)
                               for t, d, o, st in zip(tap, m.dilation, out, m.stride))
                sums[(slice(None), *tap)] += xp[(slice(None), *window)].sum(tuple(range(1, xp.dim())))
            counts.add_(x.shape[0] * math.prod(out))
        return fn

    def hooks(self) -> dict[str, Callable[[torch.Tensor], None]]:
        return {c.path: self._hook(c) for c in self.todo}

    def apply(self) -> list[dict]:
        """Write ``Δb`` into every consumer of ``pruned``; returns ``{"path", "max_abs_delta"}`` per layer."""
        distributed.all_reduce_sum_many([self.sums[c.path] for c in self.todo]
                                        + [self.counts[c.path] for c in self.todo])
        records = []
        for c in self.todo:
            n = float(self.counts[c.path])
            if n == 0:
                continue
            mean = self.sums[c.path] / n
            w = self.weights[c.path].double()
            delta = w @ mean if c.kind == "linear" else w.reshape(w.shape[0], -1) @ mean.reshape(-1)
            add_to_bias(self.pruned.get_submodule(c.path), delta)
            records.append({"path": c.path, "max_abs_delta": float(delta.abs().max())})
        log.info("recover bias: compensated %d layers", len(records))
        self.records = records
        return records


def run_bias_step(step: BiasCompensation, data: Any) -> list[dict]:
    """Gather ``step``'s statistics in one pass of the dense model over ``data`` and apply them."""
    if not step.todo:
        return []
    for inputs in input_batches(data, "recover 'bias'", "recover bias"):
        run_watching(step.dense, inputs, step.calls, on_input=step.hooks())
    return step.apply()


def compensate(dense: nn.Module, pruned: nn.Module, consumers: list[Consumer], data: Any) -> list[dict]:
    """Add each consumer's expected removed-input contribution to its bias in ``pruned`` (both models in eval mode,
    no grad), from one pass of the dense model. Returns ``{"path", "max_abs_delta"}`` per layer changed."""
    return run_bias_step(BiasCompensation(dense, pruned, consumers), data)


__all__ = ["add_to_bias", "compensate"]
