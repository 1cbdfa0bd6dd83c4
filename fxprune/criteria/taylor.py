"""First-order Taylor criterion: per unit, the sum of |w * dL/dw| over every parameter value the unit owns.

Sources: Molchanov et al., "Importance Estimation for Neural Network Pruning", arXiv 1906.10771 (first-order
Taylor expansion of the loss on the weights, summed over a filter's weights); LPViT, arXiv 2407.02068 (the score
|W * g| with g the gradient of the output energy mean(f(x)^2), which needs no labels).

Our reading (not fixed by the papers):
- ``|w * g|`` is computed per calibration batch and averaged over batches (the paper accumulates per mini-batch).
- The loss is the cross-entropy of the model's first output when a batch carries integer labels, and the output
  energy ``mean(f(x)^2)`` (summed over every output tensor) for unlabeled batches.
- A unit owns the rows it produces, the columns that read it, its biases and its norm scales/shifts
  (DepGraph-style group sum, arXiv 2301.12900); running statistics have no gradient and do not count.
- Gradients are taken in eval mode (running BN statistics), so the scores do not depend on batch composition.

This module also holds the calibration-data helpers shared by the data-driven criteria (``hessian``, ``catro``).
``data`` convention: a re-iterable (list, DataLoader) of batches; a batch is a tensor or tuple of tensors
(unlabeled inputs), or a pair ``(inputs, labels)`` whose labels are an integer tensor.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..analysis import Analysis
from ..errors import FxPruneError
from ..outputs import tensors_of
from ..progress import calibration_pass
from .base import ScoreContext, register_criterion, slot_values, unit_sum

log = logging.getLogger(__name__)

#: parameter roles a unit owns whose values get gradients
GRAD_ROLES = ("weight", "weight_in", "bias", "scale", "shift", "attr")


def _as_inputs(x: Any) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def split_batch(batch: Any) -> tuple[tuple, torch.Tensor | None]:
    """``(inputs, labels)`` of one calibration batch; labels are ``None`` for an unlabeled batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and not batch[1].is_floating_point() and not batch[1].is_complex():
        return _as_inputs(batch[0]), batch[1]
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch), None
    raise FxPruneError(f"calibration batch must be a tensor, a tuple of tensors or (inputs, labels), "
                       f"got {type(batch).__name__}")


def iter_batches(ctx: ScoreContext, criterion: str, *,
                 labels: bool = False) -> Iterator[tuple[tuple, torch.Tensor | None]]:
    """Yield ``(inputs, labels)`` from ``ctx.data``; raise ``FxPruneError`` naming ``criterion`` if it is missing,
    empty, or (with ``labels=True``) unlabeled."""
    if ctx.data is None:
        need = "(inputs, labels) batches" if labels else "calibration batches"
        raise FxPruneError(f"criterion '{criterion}' needs data: pass fxprune.compile(..., data=<iterable of {need}>)")
    n = 0
    for batch in calibration_pass(ctx.data, f"criterion {criterion}"):
        inputs, y = split_batch(batch)
        if labels and y is None:
            raise FxPruneError(f"criterion '{criterion}' needs labeled data: every batch must be (inputs, labels) "
                               f"with integer labels")
        n += 1
        yield inputs, y
    if n == 0:
        raise FxPruneError(f"criterion '{criterion}': data yielded no batches (an exhausted iterator? pass a list "
                           f"or a DataLoader, which can be iterated once per pruning step)")


def batch_loss(output: Any, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the first output tensor against ``labels``, or the output energy if unlabeled."""
    outs = tensors_of(output)
    if not outs:
        raise FxPruneError("the model returned no tensor: a gradient criterion needs a differentiable output")
    if labels is not None:
        logits = outs[0]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device))
    return sum(o.float().pow(2).mean() for o in outs if o.is_floating_point())




def grad_statistic(a: Analysis, ctx: ScoreContext, criterion: str,
                   per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over calibration batches of ``per_batch(w, g)`` for every parameter of a copy of ``a.gm``."""
    gm = copy.deepcopy(a.gm).eval()
    params = dict(gm.named_parameters())
    for p in params.values():
        p.requires_grad_(p.is_floating_point())
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    n = 0
    with torch.enable_grad():
        for inputs, labels in iter_batches(ctx, criterion):
            gm.zero_grad(set_to_none=True)
            batch_loss(gm(*inputs), labels).backward()
            for name, p in params.items():
                if p.grad is not None:
                    acc[name] += per_batch(p.detach().float(), p.grad.detach().float())
            n += 1
    # under torch.distributed: the mean over every rank's batches (each rank passes its own shard as data)
    distributed.all_reduce_sum_many(list(acc.values()))
    n = distributed.all_reduce_count(n)
    return {name: t / n for name, t in acc.items()}


def scored_module(gm: fx.GraphModule, values: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` whose parameters hold ``values`` (same names), so the op rules slice them like weights."""
    out = copy.deepcopy(gm)
    first: dict[int, str] = {}
    every = list(out.named_parameters(remove_duplicate=False))  # shared parameters appear under each name
    for name, p in every:
        first.setdefault(id(p), name)
    for name, p in every:
        value = values.get(first[id(p)])
        if value is None:
            continue
        prefix, _, attr = name.rpartition(".")
        owner = out.get_submodule(prefix) if prefix else out
        setattr(owner, attr, nn.Parameter(value.detach().clone(), requires_grad=False))
    return out


def unit_scores_of(a: Analysis, values: dict[str, torch.Tensor], roles: tuple[str, ...] = GRAD_ROLES) -> np.ndarray:
    """Per unit, the sum of ``values`` (per-parameter-value scores) over the values the unit owns."""
    scored = dataclasses.replace(a, gm=scored_module(a.gm, values))
    return unit_sum(a, slot_values(scored, roles, lambda v: v.sum(1)))


@register_criterion("taylor")
class TaylorCriterion:
    """Sum over the unit's parameter values of ``|w * g|``, averaged over calibration batches (needs ``data``)."""

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        values = grad_statistic(analysis, ctx, "taylor", lambda w, g: (w * g).abs())
        return unit_scores_of(analysis, values)
