"""Block criteria of the ``blocksparse`` stage, registered by name (``lpvit`` lives in ``lpvit.py``).

A block criterion returns, for every chosen layer, two ``[block rows, block columns]`` float64 tensors:

* ``score``: importance; inside a layer, blocks are removed in increasing score order (nested masks);
* ``distortion``: the (non-negative, additive) cost of removing each block, from which the layer's
  rate-distortion curve ``D(k)`` = cost of removing its ``k`` lowest-scoring blocks is built.

The allocator (``allocate.py``) then spends one slope (cost per removed MAC / weight) across all layers.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx

from ...criteria.base import ScoreContext
from ...criteria.lamp import lamp_scores
from ...errors import RecipeError
from .layers import LinearLayer


@dataclass
class BlockCosts:
    """Per block of one layer: ``score`` (higher = keep longer) and ``distortion`` (cost of removing it)."""

    score: torch.Tensor
    distortion: torch.Tensor


class BlockCriterion(Protocol):
    name: str

    def costs(self, gm: fx.GraphModule, layers: list[LinearLayer], ctx: ScoreContext,
              max_batches: int) -> list[BlockCosts]:
        """One ``BlockCosts`` per layer, in the order of ``layers``."""


_BLOCK_CRITERIA: dict[str, Callable[[], BlockCriterion]] = {}


def register_block_criterion(name: str) -> Callable[[type], type]:
    """Class decorator registering a block criterion under ``name`` (the ``blocksparse`` stage's ``criterion``)."""

    def deco(cls: type) -> type:
        cls.name = name
        _BLOCK_CRITERIA[name] = cls
        return cls

    return deco


def get_block_criterion(name: Any, field_path: str = "criterion") -> BlockCriterion:
    if not isinstance(name, str) or name not in _BLOCK_CRITERIA:
        close = difflib.get_close_matches(str(name), _BLOCK_CRITERIA, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(field_path, f"unknown block criterion {name!r}{hint}; available: "
                                      f"{', '.join(sorted(_BLOCK_CRITERIA))}")
    return _BLOCK_CRITERIA[name]()


def blocks_of(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """View a ``[N, K]`` tensor as ``[N // BN, K // BK, BN * BK]`` (block row, block column, values)."""
    n, k = t.shape
    bn, bk = block
    return t.reshape(n // bn, bn, k // bk, bk).permute(0, 2, 1, 3).reshape(n // bn, k // bk, bn * bk)


def block_sq_norms(layer: LinearLayer) -> torch.Tensor:
    """Squared Frobenius norm of every block of the layer's weight (float64)."""
    return blocks_of(layer.module.weight.detach().double(), layer.block).pow(2).sum(-1)


@register_block_criterion("l2")
class L2BlockCriterion:
    """Squared block norm, as both score and distortion (global magnitude pruning of blocks; data-free)."""

    def costs(self, gm: fx.GraphModule, layers: list[LinearLayer], ctx: ScoreContext,
              max_batches: int) -> list[BlockCosts]:
        out = []
        for layer in layers:
            sq = block_sq_norms(layer)
            out.append(BlockCosts(sq, sq.clone()))
        return out


@register_block_criterion("dimap")
class DIMAPBlockCriterion:
    """DIMAP (arXiv 2404.13648) on blocks: ``||B||^2 / sum of ||B'||^2 over the layer's blocks with ||B'|| >= ||B||``.

    Our reading: the paper scores single weights by their share of the layer's squared Frobenius norm among the
    weights at least as large, which bounds the relative output distortion; a block plays the weight's part. The
    score is already a normalised distortion, comparable across layers, so it is also the block's cost.
    """

    def costs(self, gm: fx.GraphModule, layers: list[LinearLayer], ctx: ScoreContext,
              max_batches: int) -> list[BlockCosts]:
        out = []
        for layer in layers:
            score = lamp_scores(block_sq_norms(layer).sqrt()).double()
            out.append(BlockCosts(score, score.clone()))
        return out
