"""The ``blocksparse`` recipe stage: LPViT-style semi-structured pruning of ``nn.Linear`` weights in blocks.

Each chosen linear layer's weight ``[out, in]`` is cut into ``block = [BN, BK]`` tiles; whole tiles are removed and
the layer becomes a ``fxprune.nn.BlockSparseLinear`` that stores only the kept tiles.

Example:
    >>> Recipe.load({"stages": [{"kind": "blocksparse", "target": {"flops": 0.4}, "block": [32, 32]}]})
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import RecipeError
from ..recipe import Targeted, register_stage


def _fraction(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(path, f"must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise RecipeError(path, f"must be in [0, 1), got {value}")
    return float(value)


def _patterns(value: object, path: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise RecipeError(path, f"must be a list of module-path glob patterns, got {value!r}")
    return value


@register_stage("blocksparse")
@dataclass
class BlockSparseStage(Targeted):
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

    kind: str = "blocksparse"
    target: dict = field(default_factory=lambda: {"sparsity": 0.5})
    block: list = field(default_factory=lambda: [32, 32])
    criterion: str = "lpvit"
    modules: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    max_sparsity: float = 0.9
    calibration_batches: int = 16
    latency: float = 0.0
    TARGETS: ClassVar[tuple[str, ...]] = ("flops", "sparsity")
    rewrites_graph: ClassVar[bool] = True

    def validate(self, path: str) -> None:
        if not isinstance(self.target, dict) or len(self.target) != 1:
            raise RecipeError(f"{path}.target", f"must hold exactly one of {', '.join(self.TARGETS)}, got {self.target!r}")
        (key, value), = self.target.items()
        if key not in self.TARGETS:
            raise RecipeError(f"{path}.target.{key}", f"unknown target for a blocksparse stage; use one of "
                                                      f"{', '.join(self.TARGETS)}")
        self.target = {key: _fraction(value, f"{path}.target.{key}")}
        block = [self.block, self.block] if isinstance(self.block, int) and not isinstance(self.block, bool) else self.block
        if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block):
            raise RecipeError(f"{path}.block", f"must be [rows, cols] of positive integers (or one integer for a "
                                               f"square block), got {self.block!r}")
        self.block = [int(block[0]), int(block[1])]
        from .criteria import get_block_criterion  # the criteria import this module's package

        get_block_criterion(self.criterion, f"{path}.criterion")
        self.modules = _patterns(self.modules, f"{path}.modules")
        self.ignore = _patterns(self.ignore, f"{path}.ignore")
        m = self.max_sparsity
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1:
            raise RecipeError(f"{path}.max_sparsity", f"must be in (0, 1), got {m!r}")
        n = self.calibration_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RecipeError(f"{path}.calibration_batches", f"must be an integer >= 1, got {n!r}")
        b = self.latency
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            raise RecipeError(f"{path}.latency", f"must be a number >= 0 (0 turns the hardware-aware term off), "
                                                 f"got {b!r}")
        self.latency = float(b)


    @property
    def block_shape(self) -> tuple[int, int]:
        return int(self.block[0]), int(self.block[1])
