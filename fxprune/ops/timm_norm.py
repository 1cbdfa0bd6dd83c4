"""timm's fused norm + activation layers (``BatchNormAct2d``, ``GroupNormAct``...), kept whole as leaves when
fxprune traces with timm's no-trace registries (MobileViT, many CNNs).

Each is its norm followed by dropout and an elementwise activation, so it gets its norm's rule: per-channel norms
shrink freely, GroupNorm by whole groups, LayerNorm-style dims stay frozen. An activation fxprune does not know to
be elementwise freezes the layer's channels (reported).
"""
from __future__ import annotations

import sys

import torch.fx as fx
from torch import nn

from ..ir.coupling import Coupling
from .elementwise import ElementwiseRule
from .norm import LAYER_NORM_REASON, BatchNormRule, GroupNormRule, LayerNormRule, _identity
from .registry import module_rule, register_op

_DONE: list[bool] = []


def _check_act(node: fx.Node, c: Coupling) -> None:
    act = getattr(c.module(), "act", None)
    if act is None or isinstance(act, nn.Identity) or isinstance(module_rule(act), ElementwiseRule):
        return
    y = c.out()
    if y is not None and y.ndim > 1:
        c.freeze(y.space(1), f"activation {type(act).__name__} of {node.format_node()} is not known to be elementwise")


class _WithAct:
    def couple(self, node: fx.Node, c: Coupling) -> None:
        super().couple(node, c)  # type: ignore[misc]
        _check_act(node, c)


class BatchNormActRule(_WithAct, BatchNormRule):
    name = "batch_norm_act"


class GroupNormActRule(_WithAct, GroupNormRule):
    name = "group_norm_act"


class LayerNormActRule(_WithAct, LayerNormRule):
    name = "layer_norm_act"


class LayerNormAct2dRule(LayerNormRule):
    """LayerNorm over the channels (dim 1) of an NCHW tensor: every dim passes through, channels stay frozen."""

    name = "layer_norm_act_2d"

    def couple(self, node: fx.Node, c: Coupling) -> None:
        x, y = _identity(node, c)
        if x is not None and x.ndim > 1:
            c.freeze(x.space(1), LAYER_NORM_REASON)


def register() -> None:
    """Register the rules for the timm layers that exist in the installed timm (once; only if timm is imported)."""
    from . import gmlp, std_conv

    std_conv.register()  # weight-standardized convs (NF-ResNets, NFNets, BiT)
    gmlp.register()  # gMLP's spatial gating unit
    if _DONE or "timm" not in sys.modules:
        return
    _DONE.append(True)
    import timm.layers as layers

    table = {BatchNormActRule: ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"),
             GroupNormActRule: ("GroupNormAct", "GroupNorm1Act"),
             LayerNormActRule: ("LayerNormAct",), LayerNormAct2dRule: ("LayerNormAct2d",)}
    for rule, names in table.items():
        types = [getattr(layers, n) for n in names if isinstance(getattr(layers, n, None), type)]
        if types:
            register_op(*types)(rule)
