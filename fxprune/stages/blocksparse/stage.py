"""The ``blocksparse`` recipe stage: LPViT-style semi-structured pruning of ``nn.Linear`` weights in blocks.

Each chosen linear layer's weight ``[out, in]`` is cut into ``block = [BN, BK]`` tiles; whole tiles are removed and
the layer becomes a ``fxprune.nn.BlockSparseLinear`` that stores only the kept tiles.

Running it: choose layers, score blocks, allocate removals, then swap through the replay pass. Compute, then swap:
the decisions become one ``Plan.rewrites`` entry, and the graph is rewritten by applying that entry with
``swap.replay_blocksparse``, the very function ``fxprune.load`` replays.

Example:
    >>> Recipe.load({"stages": [{"kind": "blocksparse", "target": {"flops": 0.4}, "block": [32, 32]}]})
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from ...criteria import ScoreContext
from ...errors import BudgetError, RecipeError
from ...plan import Plan
from ...work import count_model
from ..base import PruningStage, is_number, register_stage, validate_counts, validate_patterns
from .allocate import LayerCurve, allocate, keep_mask
from .criteria import BlockCosts, get_block_criterion
from .latency import efficiency_factors, layer_latencies
from .layers import LinearLayer, select_layers
from .swap import PASS_NAME, mask_to_rows, replay_blocksparse

log = logging.getLogger(__name__)


def _block_pair(block: Any) -> Any:
    """``[n, n]`` for one integer ``n`` (a square block), else ``block`` as given."""
    return [block, block] if isinstance(block, int) and not isinstance(block, bool) else block


@register_stage("blocksparse")
@dataclass
class BlockSparseStage(PruningStage):
    """Remove whole ``block``-shaped tiles of linear weights (LPViT, arXiv 2407.02068).

    Fields:
        target: ``{"flops": f}``: remove the fraction ``f`` of the model's MACs (counted as everywhere in
            fxprune, the same meaning as in a ``channels`` stage), or ``{"sparsity": s}``: remove the fraction
            ``s`` of the chosen layers' blocks (in a ViT, where every chosen layer sees the same tokens, this is
            also the fraction of those layers' MACs removed). Met within 1%.
        block: ``[BN, BK]`` (rows of the weight = output features, columns = input features), or one integer for
            square blocks, e.g. ``[16, 16]``, ``32``, ``[64, 32]``. Must tile every chosen layer.
        criterion: ``lpvit`` (data-driven: block-mean ``|W * g|`` with ``g`` the gradient of the output energy
            ``mean(f(x)^2)`` on ``fxprune.compile(..., data=...)``, else on ``example_inputs``; per-layer
            rate-distortion curves with an empirical-Fisher second-order term; one slope for all layers),
            ``dimap`` (weights only: a block's share of the layer's squared norm among blocks at least as large)
            or ``l2`` (weights only: squared block norm).
        modules: glob patterns of the ``nn.Linear`` module paths to prune. Empty (default): every linear layer
            whose weight the block tiles, except the layers producing the model's outputs (the classifier head).
            A layer named here that the block does not tile is an error.
        ignore: glob patterns of module paths never pruned.
        max_sparsity: at most this fraction of one layer's blocks is removed.
        calibration_batches: at most this many batches of ``data`` are used by ``lpvit``.
        latency: strength of the hardware-aware term (0 = off). Each chosen layer's dense latency is measured
            on its weight's device (cached in ``~/.cache/fxprune/latency.json``); a block's distortion is divided
            by ``e ** latency``, ``e`` = the layer's time per MAC over the average, so layers where a MAC costs
            more time lose more blocks. ``1``: distortion per unit of time saved. The budget is unchanged.
    """

    criterion: str = "lpvit"
    block: list = field(default_factory=lambda: [32, 32])
    modules: list = field(default_factory=list)
    calibration_batches: int = 16
    latency: float = 0.0
    TARGETS: ClassVar[tuple[str, ...]] = ("flops", "sparsity")
    rewrites_graph: ClassVar[bool] = True

    def validate(self, path: str) -> None:
        self.validate_target(path)
        block = _block_pair(self.block)
        if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block):
            raise RecipeError(f"{path}.block", f"must be [rows, cols] of positive integers (or one integer for a "
                                               f"square block), got {self.block!r}")
        self.validate_criterion(path)
        validate_patterns(self.modules, f"{path}.modules")
        validate_patterns(self.ignore, f"{path}.ignore")
        self.validate_budget(path)
        validate_counts(self, path, ("calibration_batches",))
        if not is_number(self.latency) or self.latency < 0:
            raise RecipeError(f"{path}.latency", f"must be a number >= 0 (0 turns the hardware-aware term off), "
                                                 f"got {self.latency!r}")

    def validate_criterion(self, path: str) -> None:
        """``criterion`` names a registered block criterion."""
        get_block_criterion(self.criterion, f"{path}.criterion")

    def normalized(self) -> BlockSparseStage:
        base = super().normalized()
        block = _block_pair(self.block)
        return dataclasses.replace(base, block=[int(block[0]), int(block[1])], latency=float(self.latency))

    def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
        return run_blocksparse_stage(gm, self, ctx)

    @property
    def block_shape(self) -> tuple[int, int]:
        block = _block_pair(self.block)
        return int(block[0]), int(block[1])


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


def run_blocksparse_stage(gm: fx.GraphModule, stage: BlockSparseStage, ctx: ScoreContext) -> Plan:
    """Decide the kept blocks, record them as a plan entry, and swap the layers by replaying that entry."""
    before = count_model(gm)
    layers, masks, stats = block_masks(gm, stage, ctx)
    entry = plan_entry(layers, masks)
    replay_blocksparse(gm, entry, ctx.example_inputs)
    after = count_model(gm)
    stats.update({"blocksparse_macs_before": float(before["macs"]), "blocksparse_macs_after": float(after["macs"]),
                  "blocksparse_macs_removed": 1 - after["macs"] / before["macs"] if before["macs"] else 0.0})
    log.info("stage blocksparse: %d layers, %.1f%% of blocks and %.1f%% of the model's MACs removed",
             len(entry["layers"]), 100 * stats["blocksparse_block_sparsity"], 100 * stats["blocksparse_macs_removed"])
    return Plan(stats=stats, rewrites=[entry])


__all__ = ["BlockSparseStage", "block_masks", "plan_entry", "run_blocksparse_stage"]
