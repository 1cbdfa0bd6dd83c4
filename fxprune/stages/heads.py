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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from ..analysis import Analysis
from ..criteria import ScoreContext
from ..errors import RecipeError
from ..ir.space import Space
from ..ops.registry import OpRule
from ..plan import Plan
from ..planner import Budget
from .base import RecoveringStage, register_stage, validate_counts
from .channels import prune_channels

#: which spaces of a node its op rule names as attention heads, or as per-head features
SpacesOf = Callable[[OpRule, fx.Node], list[Space]]


def head_spaces(rule: OpRule, node: fx.Node) -> list[Space]:
    """The spaces of ``node`` its rule names as whole attention heads (``OpRule.head_spaces``)."""
    return rule.head_spaces(node)


def head_groups(a: Analysis, spaces_of: SpacesOf = head_spaces) -> set[int]:
    """Ids of the groups of ``a`` that hold an attention head dim (see the module docstring), or the groups holding
    the spaces another ``spaces_of`` names (``head_dim``: per-head features)."""
    groups = set()
    for node in a.gm.graph.nodes:
        rule = a.node_rules.get(node.name)
        for space in spaces_of(rule, node) if rule is not None else ():
            if space in a.index:
                groups.add(int(a.space_group[a.index[space]]))
    return groups


@register_stage("heads")
@dataclass
class HeadStage(RecoveringStage):
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

    scope: str = "local"
    steps: int = 1

    def validate(self, path: str) -> None:
        self.validate_target(path)
        self.validate_criterion(path)
        if self.scope not in ("local", "global"):
            raise RecipeError(f"{path}.scope", f"must be 'local' or 'global', got {self.scope!r}")
        self.validate_budget(path)
        validate_counts(self, path, ("steps",))

    def budget(self) -> Budget:
        """``round_to`` counts heads (units), not channels."""
        return dataclasses.replace(super().budget(), scope=self.scope, round_units=True)

    def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
        """Remove heads as this stage says; returns the composed channel plan (original indices)."""
        return prune_channels(gm, self, ctx, self.budget(), steps=self.steps, options={}, groups=head_groups)


__all__ = ["HeadStage", "head_groups", "head_spaces"]
