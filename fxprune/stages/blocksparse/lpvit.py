"""LPViT block criterion: block-mean ``|W * g|`` and a second-order rate-distortion cost, from unlabeled data.

Source: Xu et al., "LPViT: Low-Power Semi-structured Pruning for Vision Transformers", arXiv 2407.02068 (code:
Akimoto-Cris/LPViT). ``g`` is the gradient of the output energy ``mean(f(x)^2)`` with respect to each weight, on
unlabeled calibration images; a block's score is the mean of ``|W * g|`` over it; each layer removes blocks in
increasing score order, and one slope shared by all layers decides how many (see ``blocksparse/allocate.py``).

Our reading (not fixed by the paper):
- Removing a block changes its weights by ``dW = -W``. The layer's distortion is a first-order term
  ``sum((dW * g)^2)`` plus a second-order term ``1/2 dW^T H dW`` with ``H`` the *diagonal* of the empirical Fisher
  ``mean_b(g_b g_b^T) + 1e-7 I`` over calibration batches ``b`` (``g`` above is ``mean_b(g_b)``). Both terms are
  sums over weights, so a block's cost is the sum over its weights and the curve ``D(k)`` is the running sum of
  the costs of the ``k`` lowest-scoring blocks. Sums (not means) keep costs of layers of different sizes
  comparable under one slope.
- The energy of a model with several outputs is the sum of each floating-point output's ``mean(t^2)``.
- ``fxprune.compile(..., data=...)`` batches are used (at most ``calibration_batches``; ``(inputs, labels)``
  batches have their labels ignored); without data the example inputs are the one calibration batch.
- Gradients are taken in eval mode on the graph being pruned (after any earlier ``channels`` stage).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from ... import distributed
from ...criteria.base import ScoreContext
from ...criteria.taylor import split_batch
from ...errors import FxPruneError
from ...outputs import tensors_of
from ...progress import calibration_pass
from .criteria import BlockCosts, blocks_of, register_block_criterion
from .layers import LinearLayer

log = logging.getLogger(__name__)

#: the damping of the empirical Fisher (LPViT's ``g g^T + 1e-7 I``)
FISHER_DAMPING = 1e-7


def _calibration(ctx: ScoreContext, max_batches: int) -> Iterator[tuple]:
    if ctx.data is None:
        if not ctx.example_inputs:
            raise FxPruneError("criterion 'lpvit' needs data or example inputs to compute gradients")
        yield tuple(ctx.example_inputs)
        return
    n = 0
    for batch in calibration_pass(ctx.data, "criterion lpvit"):
        if n >= max_batches:
            break
        inputs, _ = split_batch(batch)
        n += 1
        yield inputs
    if n == 0:
        raise FxPruneError("criterion 'lpvit': data yielded no batches (an exhausted iterator? pass a list or a "
                           "DataLoader)")


def output_energy(output: Any) -> torch.Tensor:
    """``sum over floating output tensors t of mean(t^2)``: the label-free loss whose gradient LPViT uses."""
    terms = [t.float().pow(2).mean() for t in tensors_of(output) if t.is_floating_point()]
    if not terms:
        raise FxPruneError("criterion 'lpvit': the model returns no floating-point tensor to differentiate")
    return torch.stack(terms).sum()


def energy_gradients(gm: fx.GraphModule, layers: list[LinearLayer], ctx: ScoreContext,
                     max_batches: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the mean gradient ``g`` and the empirical-Fisher diagonal ``mean(g_b^2)`` (float64)."""
    weights = [layer.module.weight for layer in layers]
    flags = {p: p.requires_grad for p in gm.parameters()}
    training = gm.training
    g_sum = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    f_sum = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    n = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        gm.eval()
        with torch.enable_grad():
            for inputs in _calibration(ctx, max_batches):
                grads = torch.autograd.grad(output_energy(gm(*inputs)), weights, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is not None:
                        g = g.detach().double()
                        g_sum[i] += g
                        f_sum[i] += g * g
                n += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        gm.train(training)
    distributed.all_reduce_sum_many(g_sum + f_sum)  # under torch.distributed: every rank's batches
    n = distributed.all_reduce_count(n)
    log.debug("lpvit: gradients of the output energy over %d calibration batches", n)
    return [g / n for g in g_sum], [f / n for f in f_sum]


@register_block_criterion("lpvit")
class LPViTBlockCriterion:
    """Score = block mean of ``|W * g|``; distortion = ``sum((W * g)^2) + 1/2 sum((F + 1e-7) W^2)`` over the block."""

    def costs(self, gm: fx.GraphModule, layers: list[LinearLayer], ctx: ScoreContext,
              max_batches: int) -> list[BlockCosts]:
        grads, fisher = energy_gradients(gm, layers, ctx, max_batches)
        out = []
        for layer, g, f in zip(layers, grads, fisher):
            w = layer.module.weight.detach().double()
            score = blocks_of((w * g).abs(), layer.block).mean(-1)
            first = blocks_of((w * g).pow(2), layer.block).sum(-1)
            second = 0.5 * blocks_of((f + FISHER_DAMPING) * w.pow(2), layer.block).sum(-1)
            out.append(BlockCosts(score, first + second))
        return out
