"""The ``heads`` stage: remove whole attention heads, and nothing else.

A head group is a coupling group holding an attention op's head dim: the head axis of ``nn.MultiheadAttention``
(``ops/attention_mha.py``), or dim ``-3`` of the queries of ``F.scaled_dot_product_attention`` or of a 4-D batched
matmul (timm's ``qkv`` Linear → reshape → permute → unbind → sdpa, whose reshape is tied by its heads factor; see
``ops/attention.py``). Its units are whole heads: the q, k and v rows of ``qkv`` and the ``proj`` columns of a head.
Op rules expose such spaces through ``head_spaces(node)``, so new attention rules (Swin, MaxViT) join by defining it.

The plan is an ordinary channel plan (kept rows of ``qkv``, kept heads of the module), so ``fxprune.save`` /
``fxprune.load`` replay it unchanged; the reshape constants (``num_heads``) and module attributes are rewritten by
the channel shrink. At least one head per attention layer is always kept.

The embedding dim (the residual stream) is not touched: its LayerNorms normalize over all channels, so removing
one changes the statistics of the others (not equal to masking). Class token, position embedding and LayerNorm
weights therefore never need to shrink for exactness.

Example:
    >>> recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}, "criterion": "l2"}]}
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch.fx as fx

from .api import run_channel_stage, stage_runner
from .criteria import ScoreContext
from .errors import RecipeError
from .graph.dependency import Analysis
from .plan import Plan
from .planner import Planner, _GroupOrder
from .recipe import Targeted, register_stage, validate_common, validate_recover_field, validate_target

log = logging.getLogger(__name__)


def head_groups(a: Analysis, spaces_of: str = "head_spaces") -> set[int]:
    """Ids of the groups of ``a`` that hold an attention head dim (see the module docstring), or with
    ``spaces_of="head_dim_spaces"`` a per-head feature dim."""
    groups = set()
    for node in a.gm.graph.nodes:
        spaces = getattr(a.node_rules.get(node.name), spaces_of, None)
        for space in spaces(node) if spaces is not None else ():
            if space in a.index:
                groups.add(int(a.space_group[a.index[space]]))
    return groups


class HeadPlanner(Planner):
    """A planner over head groups only; ``round_to`` counts heads."""

    spaces_of = "head_spaces"

    def __init__(self, analysis: Analysis, scores: np.ndarray, stage: "HeadStage", done: dict[int, int] | None = None,
                 normalize: bool = True) -> None:
        self.head_groups = head_groups(analysis, self.spaces_of)
        super().__init__(analysis, scores, stage, done, normalize)
        for o in self.orders:
            o.step = stage.round_to
        if not self.orders:
            log.warning("%s stage: nothing of this kind is prunable in this model", stage.kind)

    def _order(self, g: int, scores: np.ndarray) -> _GroupOrder:
        o = super()._order(g, scores)
        if g not in self.head_groups:
            o.order = o.order[:0]  # dropped by Planner.__init__
        return o


@register_stage("heads")
@dataclass
class HeadStage(Targeted):
    """Remove whole attention heads (and rewrite ``num_heads`` and every reshape constant that depends on it).

    Fields:
        target: ``{"sparsity": s}`` (fraction of each layer's heads, or of all heads with ``scope: global``),
            ``{"flops": f}`` or ``{"params": p}`` (fraction of the whole model's MACs / parameters removed by
            dropping heads alone).
        criterion: any registered criterion (they read each head's q/k/v rows and ``proj`` columns).
        scope: ``local`` (same fraction per layer) or ``global`` (one ranking of mean-normalized head scores).
        ignore: glob patterns of module paths whose heads must not change.
        round_to: kept heads per layer rounded up to a multiple of this.
        steps: prune in this many steps, re-scoring in between.
        max_sparsity: at most this fraction of a layer's heads is removed (one head is always kept).
        seed: seed of random criteria.
        recover: recovery after pruning, as in the ``channels`` stage (``fxprune.recover``).
    """

    kind: str = "heads"
    target: dict = field(default_factory=lambda: {"sparsity": 0.5})
    criterion: str = "l2"
    scope: str = "local"
    ignore: list = field(default_factory=list)
    round_to: int = 1
    steps: int = 1
    max_sparsity: float = 0.9
    seed: int = 0
    recover: list = field(default_factory=list)
    TARGETS: ClassVar[tuple[str, ...]] = ("sparsity", "flops", "params")

    def validate(self, path: str) -> None:
        validate_target(self, path)
        validate_recover_field(self, path)
        if self.scope not in ("local", "global"):
            raise RecipeError(f"{path}.scope", f"must be 'local' or 'global', got {self.scope!r}")
        validate_common(self, path, ("round_to", "steps"))



@stage_runner(HeadStage)
def run_heads_stage(gm: fx.GraphModule, stage: HeadStage, ctx: ScoreContext, inputs: tuple) -> Plan:
    """Remove heads as ``stage`` says; returns the composed channel plan (original indices)."""
    return run_channel_stage(gm, stage, ctx, inputs, planner_cls=HeadPlanner)


__all__ = ["HeadStage", "HeadPlanner", "head_groups", "run_heads_stage"]
