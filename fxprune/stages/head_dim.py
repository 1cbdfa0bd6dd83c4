"""The ``head_dim`` stage: shrink the per-head feature dim of attention (q/k and v features of every head).

Packed ``qkv`` layouts (timm's ``qkv`` Linear → reshape ``(B, N, 3, H, D)``) can carry channels through one reshape
factor only, and the default analysis picks the heads (``ops/attention.py``). This stage analyses the graph with
the head-dim factor preferred instead (the analysis option ``{"qkv_factor": "head_dim"}``): a unit is feature ``d``
of q, k and v in every head of a layer. The sdpa rewrite pins ``scale=`` to the original ``1/sqrt(D)``, so
shrunk ≡ masked. For ``nn.MultiheadAttention`` the q/k and v head dims are the module's own axes.

Because its units only exist under that preference, the stage rewrites the graph (``rewrites_graph = True``): its
kept indices are recorded as a ``Plan.rewrites`` entry ``{"pass": "head_dim", "kept": ..., "sizes": ...}`` (indices
of the graph as the earlier stages left it) that ``fxprune.load`` replays under the same option. Like other
rewriting stages it comes after every ``channels``/``heads`` stage.

Example:
    >>> recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.25}},
    ...                      {"kind": "head_dim", "target": {"sparsity": 0.25}, "round_to": 8}]}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from ..analysis import Analysis
from ..criteria import ScoreContext
from ..ir.space import Space
from ..ops.attention import QKV_FACTOR
from ..ops.registry import OpRule
from ..passes.replay import register_rewrite
from ..passes.shrink_channels import ShrinkChannels
from ..plan import Plan
from ..trace import record_shapes
from .base import register_stage
from .channels import prune_channels
from .heads import HeadStage, head_groups

#: the analysis options the stage plans and replays under: packed-qkv reshapes carry the per-head feature dim
OPTIONS = {QKV_FACTOR: "head_dim"}


def head_dim_spaces(rule: OpRule, node: fx.Node) -> list[Space]:
    """The per-head feature dims of ``node``'s attention operands, as its rule names them."""
    return rule.head_dim_spaces(node)


def head_dim_groups(a: Analysis) -> set[int]:
    """Ids of the groups of ``a`` holding an attention op's per-head feature dim."""
    return head_groups(a, head_dim_spaces)


@register_stage("head_dim")
@dataclass
class HeadDimStage(HeadStage):
    """Remove per-head features of attention (same fields as ``heads``; ``round_to`` counts head-dim features)."""

    rewrites_graph: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
        """Shrink head dims as this stage says; returns a plan holding one ``head_dim`` rewrite entry."""
        plan = prune_channels(gm, self, ctx, self.budget(), steps=self.steps, options=OPTIONS, groups=head_dim_groups)
        entry = {"pass": "head_dim", "kept": plan.kept, "sizes": plan.sizes}
        if plan.options != OPTIONS:  # module mode adds its own analysis options (``{"chunks": "even"}``)
            entry["options"] = dict(plan.options)
        return Plan(groups=plan.groups, frozen=plan.frozen, stats=plan.stats, rewrites=[entry])


@register_rewrite("head_dim")
def replay_head_dim(gm: fx.GraphModule, entry: dict, example_inputs: tuple) -> None:
    """Re-apply a ``head_dim`` entry: shapes re-recorded (earlier rewrites changed them), then the channel shrink
    under the head-dim analysis option."""
    record_shapes(gm, example_inputs)
    ShrinkChannels(Plan(kept=entry["kept"], sizes=entry["sizes"], options={**OPTIONS, **entry.get("options", {})}),
                  example_inputs)(gm)


__all__ = ["HeadDimStage", "head_dim_groups", "replay_head_dim"]
