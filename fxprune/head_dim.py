"""The ``head_dim`` stage: shrink the per-head feature dim of attention (q/k and v features of every head).

Packed ``qkv`` layouts (timm's ``qkv`` Linear → reshape ``(B, N, 3, H, D)``) can carry channels through one reshape
factor only, and the default analysis picks the heads (``ops/attention.py``). This stage analyses the graph with
the head-dim factor preferred instead (``prefer_factor("head_dim")``): a unit is feature ``d`` of q, k and v in
every head of a layer. The sdpa rewrite pins ``scale=`` to the original ``1/sqrt(D)``, so shrunk ≡ masked. For
``nn.MultiheadAttention`` the q/k and v head dims are the module's own axes.

Because its units only exist under that preference, the stage rewrites the graph (``rewrites_graph = True``): its
kept indices are recorded as a ``Plan.rewrites`` entry ``{"pass": "head_dim", "kept": ..., "sizes": ...}`` (indices
of the graph as the earlier stages left it) that ``fxprune.load`` replays under the same preference. Like other
rewriting stages it comes after every ``channels``/``heads`` stage.

Example:
    >>> recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.25}},
    ...                      {"kind": "head_dim", "target": {"sparsity": 0.25}, "round_to": 8}]}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from .api import run_channel_stage, stage_runner
from .criteria import ScoreContext
from .heads import HeadPlanner, HeadStage
from .ops.attention import prefer_factor
from .passes.replay import register_rewrite
from .passes.shrink_channels import ShrinkChannels
from .plan import Plan
from .recipe import register_stage
from .trace import record_shapes


class HeadDimPlanner(HeadPlanner):
    """A planner over the groups holding an attention op's per-head feature dim; ``round_to`` counts features."""

    spaces_of = "head_dim_spaces"


@register_stage("head_dim")
@dataclass
class HeadDimStage(HeadStage):
    """Remove per-head features of attention (same fields as ``heads``; ``round_to`` counts head-dim features)."""

    kind: str = "head_dim"
    rewrites_graph: ClassVar[bool] = True


@stage_runner(HeadDimStage)
def run_head_dim_stage(gm: fx.GraphModule, stage: HeadDimStage, ctx: ScoreContext, inputs: tuple) -> Plan:
    """Shrink head dims as ``stage`` says; returns a plan holding one ``head_dim`` rewrite entry."""
    with prefer_factor("head_dim"):
        plan = run_channel_stage(gm, stage, ctx, inputs, planner_cls=HeadDimPlanner)
    entry = {"pass": "head_dim", "kept": plan.kept, "sizes": plan.sizes}
    return Plan(groups=plan.groups, frozen=plan.frozen, stats=plan.stats, rewrites=[entry])


@register_rewrite("head_dim")
def replay_head_dim(gm: fx.GraphModule, entry: dict, example_inputs: tuple) -> None:
    """Re-apply a ``head_dim`` entry: shapes re-recorded (earlier rewrites changed them), then the channel shrink
    under the head-dim preference."""
    record_shapes(gm, example_inputs)
    with prefer_factor("head_dim"):
        ShrinkChannels(Plan(kept=entry["kept"], sizes=entry["sizes"]), example_inputs)(gm)


__all__ = ["HeadDimStage", "HeadDimPlanner", "run_head_dim_stage", "replay_head_dim"]
