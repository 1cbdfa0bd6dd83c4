"""Opt-in pruning of LayerNorm / RMSNorm normalized dims (``layer_norm: renormalize`` on a channel stage).

By default (``layer_norm: freeze``) the normalized dims of a LayerNorm are frozen: its mean and variance span every
channel, so removing one changes the others and "shrunk == original with channels zero-masked" cannot hold. With
``renormalize`` those dims prune too, with this precisely defined meaning:

    the pruned LayerNorm normalizes over the kept channels only.

That is, for kept channels ``K``, ``y[K] = (x[K] - mean(x[K])) / sqrt(var(x[K]) + eps) * weight[K] + bias[K]``
(RMSNorm: ``x[K] / sqrt(mean(x[K]**2) + eps) * weight[K]``). The normalized dims tie to the norm's weight/bias
(a parameter axis per normalized dim), and the rewrite slices weight/bias and sets ``normalized_shape``. The test
oracle (``fxprune.testing.masked_model``) reproduces this with an independent masked LayerNorm when the plan
records ``options["layer_norm"] == "renormalize"``. This is how a ViT's embedding dim (its residual stream, with
class token, position embedding and every LayerNorm) becomes prunable.

The option reaches the op rules through ``analyze(gm, ignore, options)`` → ``Coupling.options``; the rules in
``ops/norm.py`` call the helpers below only when it is set, so the default analysis is unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx
from torch import nn

from ..ir.context import RewriteContext, SizeContext
from ..ir.coupling import Coupling
from ..ir.space import Port, Space
from .tensor_attr import slice_attr

FREEZE = "freeze"
RENORMALIZE = "renormalize"
LAYER_NORM_MODES = (FREEZE, RENORMALIZE)
_AFFINE = ("weight", "bias")


def renormalizing(c: Coupling) -> bool:
    """Whether this analysis lets LayerNorm-normalized dims prune (``options["layer_norm"] == "renormalize"``)."""
    return c.options.get("layer_norm", FREEZE) == RENORMALIZE


def tie_normalized_params(c: Coupling, x: Port, normalized_shape: tuple[int, ...]) -> None:
    """Tie each normalized (last) dim of ``x`` to parameter axis ``j`` of the node's norm module."""
    k = len(normalized_shape)
    for j, n in enumerate(normalized_shape):
        d = x.ndim - k + j
        if x.shape[d] == n:
            c.tie(x.space(d), c.param(j, n), size=n)


def shrink_norm_module(gm: fx.GraphModule, path: str, r: RewriteContext) -> None:
    """Slice weight/bias of the LayerNorm/RMSNorm at ``path`` along every shrunk axis; set ``normalized_shape``."""
    m = gm.get_submodule(path)
    shape = list(m.normalized_shape)
    for j in range(len(shape)):
        keep = r.kept_param(path, j)
        if keep is None:
            continue
        for name in _AFFINE:
            slice_attr(m, name, j, keep)
        shape[j] = len(keep)
    m.normalized_shape = tuple(shape)


def norm_param_count(gm: fx.GraphModule, path: str, s: SizeContext) -> int:
    """Parameters of the norm at ``path`` at the sizes of ``s`` (its full count when nothing shrank)."""
    m = gm.get_submodule(path)
    shape = [s.new_sizes.get(Space("@" + path, 0, j), n) for j, n in enumerate(m.normalized_shape)]
    n_affine = sum(1 for p in _AFFINE if isinstance(getattr(m, p, None), nn.Parameter))
    return n_affine * math.prod(shape)


def rewrite_normalized_shape(node: fx.Node, r: RewriteContext) -> None:
    """Set the ``normalized_shape`` argument of ``F.layer_norm`` / ``F.rms_norm`` to the input's shrunk last dims."""
    if isinstance(node.args[0], fx.Node) and len(node.args) > 1:
        where, old = 1, node.args[1]
    elif "normalized_shape" in node.kwargs:
        where, old = "normalized_shape", node.kwargs["normalized_shape"]
    else:
        return
    if isinstance(old, int):
        old = (old,)
    if not isinstance(old, (list, tuple)) or not all(isinstance(v, int) for v in old):
        return  # computed at run time (a node): follows the shrunk input by itself
    shape = r.shape(node.args[0])
    new = tuple(shape[len(shape) - len(old):])
    if new == tuple(old):
        return
    value: Any = list(new) if isinstance(node.args[1] if where == 1 else old, list) else new
    if where == 1:
        node.args = (node.args[0], value, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": value}


__all__ = ["FREEZE", "RENORMALIZE", "LAYER_NORM_MODES", "renormalizing", "tie_normalized_params",
           "shrink_norm_module", "norm_param_count", "rewrite_normalized_shape"]
