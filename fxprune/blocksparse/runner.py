"""Runs a ``blocksparse`` stage: choose layers, score blocks, allocate removals, then swap through the replay pass.

Compute, then swap: the decisions become one ``Plan.rewrites`` entry, and the graph is rewritten by applying that
entry with ``passes.swap_blocksparse.replay_blocksparse`` - the very function ``fxprune.load`` replays.
"""
from __future__ import annotations

import logging

import torch.fx as fx

from ..api import stage_runner
from ..criteria.base import ScoreContext
from ..errors import BudgetError
from ..passes.swap_blocksparse import PASS_NAME, mask_to_rows, replay_blocksparse
from ..plan import Plan
from ..work import count_model
from .allocate import LayerCurve, allocate, keep_mask
from .criteria import BlockCosts, get_block_criterion
from .latency import efficiency_factors, layer_latencies
from .layers import LinearLayer, select_layers
from .stage import BlockSparseStage

log = logging.getLogger(__name__)


def plan_entry(layers: list[LinearLayer], masks: list) -> dict:
    """The JSON plan entry for ``layers`` with keep-masks ``masks`` (layers that lose no block are left out)."""
    out = {}
    for layer, mask in zip(layers, masks):
        if bool(mask.all()):
            continue
        out[layer.path] = {"block": list(layer.block), "shape": [layer.module.out_features, layer.module.in_features],
                           "kept": mask_to_rows(mask)}
    return {"pass": PASS_NAME, "layers": out}


def block_masks(gm: fx.GraphModule, stage: BlockSparseStage, ctx: ScoreContext) -> tuple[list[LinearLayer], list, dict]:
    """The chosen layers, their keep-masks and allocation statistics (the stage's decisions, nothing applied)."""
    layers = select_layers(gm, stage.block_shape, stage.modules, stage.ignore)
    costs = get_block_criterion(stage.criterion).costs(gm, layers, ctx, stage.calibration_batches)
    if stage.target_kind == "flops":
        rates = [layer.block_macs for layer in layers]
        target = stage.target_value * count_model(gm)["macs"]
    else:
        rates = [layer.block_params for layer in layers]
        target = stage.target_value * sum(layer.n_blocks * layer.block_params for layer in layers)
    stats: dict[str, float] = {}
    if stage.latency > 0:  # hardware-aware: blocks of layers slower per MAC are cheaper to remove
        ms = layer_latencies(layers)
        factors = efficiency_factors(layers, ms)
        costs = [BlockCosts(c.score, c.distortion / e ** stage.latency) for c, e in zip(costs, factors)]
        stats["blocksparse_dense_linear_ms"] = float(sum(ms))
    curves = [LayerCurve.from_scores(c.score, c.distortion, r, stage.max_sparsity) for c, r in zip(costs, rates)]
    try:
        removed, slope = allocate(curves, target)
    except BudgetError as exc:
        raise BudgetError(f"blocksparse target {stage.target} with block {stage.block} cannot be met: {exc}") from exc
    masks = [keep_mask(c, k, layer.grid) for c, k, layer in zip(curves, removed, layers)]
    total = sum(layer.n_blocks for layer in layers)
    linear_macs = sum(layer.n_blocks * layer.block_macs for layer in layers)
    removed_macs = sum(k * layer.block_macs for k, layer in zip(removed, layers))
    stats.update({"blocksparse_slope": float(slope), "blocksparse_block_sparsity": sum(removed) / total,
                  "blocksparse_layer_macs_removed": removed_macs / linear_macs,
                  "blocksparse_layers": float(sum(k > 0 for k in removed))})
    return layers, masks, stats


@stage_runner(BlockSparseStage)
def run_blocksparse_stage(gm: fx.GraphModule, stage: BlockSparseStage, ctx: ScoreContext, inputs: tuple) -> Plan:
    """Decide the kept blocks, record them as a plan entry, and swap the layers by replaying that entry."""
    before = count_model(gm)
    layers, masks, stats = block_masks(gm, stage, ctx)
    entry = plan_entry(layers, masks)
    replay_blocksparse(gm, entry, inputs)
    after = count_model(gm)
    stats.update({"blocksparse_macs_before": float(before["macs"]), "blocksparse_macs_after": float(after["macs"]),
                  "blocksparse_macs_removed": 1 - after["macs"] / before["macs"] if before["macs"] else 0.0})
    log.info("stage blocksparse: %d layers, %.1f%% of blocks and %.1f%% of the model's MACs removed",
             len(entry["layers"]), 100 * stats["blocksparse_block_sparsity"], 100 * stats["blocksparse_macs_removed"])
    return Plan(stats=stats, rewrites=[entry])
