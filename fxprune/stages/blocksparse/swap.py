"""``SwapBlockSparse``: replace chosen ``nn.Linear`` modules by ``BlockSparseLinear`` as a plan entry says.

The entry (one ``Plan.rewrites`` item, JSON) is::

    {"pass": "blocksparse",
     "layers": {"blocks.0.mlp.fc1": {"block": [32, 32], "shape": [768, 192], "kept": [[0, 2, 5], [], ...]}, ...}}

``kept[r]`` lists the kept block columns of block row ``r`` (sorted); ``shape`` is the dense weight's
``[out_features, in_features]``. The pass decides nothing: the ``blocksparse`` stage computes the entry and then
applies it through ``replay_blocksparse``, the same registered function ``fxprune.load`` replays.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ...errors import ExampleInputsError, PlanError, RewriteError
from ...ir.spec import spec_of
from ...nn.blocksparse_linear import BlockSparseLinear
from ...passes.replay import register_rewrite
from ...trace import record_shapes

log = logging.getLogger(__name__)

PASS_NAME = "blocksparse"


def mask_to_rows(mask: torch.Tensor) -> list[list[int]]:
    """Bool ``[rows, cols]`` block mask -> per block row, the kept block columns."""
    return [torch.nonzero(row).flatten().tolist() for row in mask.cpu()]


def rows_to_mask(rows: list[list[int]], grid: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(grid, dtype=torch.bool)
    for r, cols in enumerate(rows):
        mask[r, cols] = True
    return mask


def _check_layer(gm: fx.GraphModule, path: str, spec: Any) -> None:
    if not isinstance(spec, dict) or set(spec) != {"block", "shape", "kept"}:
        raise PlanError(f"blocksparse entry of '{path}' must have exactly 'block', 'shape' and 'kept', got {spec!r}")
    try:
        module = gm.get_submodule(path)
    except AttributeError as exc:
        raise PlanError(f"blocksparse entry names module '{path}', which this model does not have") from exc
    if not (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        raise PlanError(f"blocksparse entry names module '{path}', a {type(module).__name__}, not an nn.Linear")
    shape = [module.out_features, module.in_features]
    if list(spec["shape"]) != shape:
        raise PlanError(f"blocksparse entry expects module '{path}' of weight shape {list(spec['shape'])}, the "
                        f"model has {shape}")
    bn, bk = spec["block"]
    if bn < 1 or bk < 1 or shape[0] % bn or shape[1] % bk:
        raise PlanError(f"blocksparse entry: block {bn}x{bk} does not tile module '{path}' "
                        f"(weight {shape[0]}x{shape[1]})")
    kept = spec["kept"]
    n_cols = shape[1] // bk
    if not isinstance(kept, list) or len(kept) != shape[0] // bn:
        raise PlanError(f"blocksparse entry of '{path}' must list kept columns for each of its {shape[0] // bn} "
                        f"block rows")
    for r, cols in enumerate(kept):
        if not isinstance(cols, list) or any(not isinstance(c, int) or not 0 <= c < n_cols for c in cols) \
                or any(b <= a for a, b in zip(cols, cols[1:])):
            raise PlanError(f"blocksparse entry of '{path}', block row {r}: kept columns must be sorted unique "
                            f"integers in [0, {n_cols}), got {cols!r}")


class SwapBlockSparse(PassBase):
    """Swap each ``nn.Linear`` named by ``entry["layers"]`` for a ``BlockSparseLinear`` holding its kept blocks.

    ``requires`` checks the entry against the graph (module exists, is a Linear of that shape, block tiles it,
    indices valid); ``call`` swaps the modules (node targets stay) and recompiles; ``ensures`` re-records shapes
    and checks that every node still produces what it did before.
    """

    def __init__(self, entry: dict, example_inputs: Sequence[Any]) -> None:
        self.entry = entry
        self.example_inputs = tuple(example_inputs)
        self.before: dict[str, Any] = {}

    def requires(self, gm: fx.GraphModule) -> None:
        layers = self.entry.get("layers")
        if self.entry.get("pass") != PASS_NAME or not isinstance(layers, dict):
            raise PlanError(f"not a blocksparse plan entry (needs 'pass': 'blocksparse' and 'layers'): "
                            f"{self.entry!r}"[:300])
        for path, spec in layers.items():
            _check_layer(gm, path, spec)

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.before = {n.name: spec_of(n) for n in gm.graph.nodes}
        for path, spec in self.entry["layers"].items():
            linear = gm.get_submodule(path)
            bn, bk = spec["block"]
            grid = (linear.out_features // bn, linear.in_features // bk)
            swapped = BlockSparseLinear.from_dense(linear, rows_to_mask(spec["kept"], grid))
            swapped.train(linear.training)
            parent, _, name = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, swapped)
            log.debug("blocksparse: %s keeps %d of %d blocks", path, swapped.nnz_blocks, grid[0] * grid[1])
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(self.entry["layers"]))

    def ensures(self, gm: fx.GraphModule) -> None:
        for path in self.entry["layers"]:
            if not isinstance(gm.get_submodule(path), BlockSparseLinear):
                raise RewriteError(f"module '{path}' was not swapped for a BlockSparseLinear")
        try:
            record_shapes(gm, self.example_inputs)
        except ExampleInputsError as exc:
            raise RewriteError(f"the block-sparse graph no longer runs (please report this with the model): "
                               f"{exc}") from exc
        for node in gm.graph.nodes:
            if node.name in self.before and spec_of(node) != self.before[node.name]:
                raise RewriteError(f"after the blocksparse swap, {node.format_node()} produces {spec_of(node)}, "
                                   f"before it produced {self.before[node.name]}")


@register_rewrite(PASS_NAME)
def replay_blocksparse(gm: fx.GraphModule, entry: dict, example_inputs: tuple) -> None:
    """Apply one ``blocksparse`` plan entry to ``gm`` in place (used by the stage and by ``fxprune.load``)."""
    SwapBlockSparse(entry, example_inputs)(gm)


__all__ = ["SwapBlockSparse", "replay_blocksparse", "mask_to_rows", "rows_to_mask", "PASS_NAME"]
