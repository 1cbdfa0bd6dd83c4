"""The ``blocksparse`` recipe stage: defaults, JSON round trip, and clear errors on bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import BudgetError, PlanError, RecipeError
from fxprune.stages.blocksparse import BlockSparseStage
from fxprune.stages.blocksparse.swap import replay_blocksparse


def _stage(**fields) -> dict:
    return {"stages": [{"kind": "blocksparse", **fields}]}


class MLP(nn.Module):
    """fc1 (64 -> 96), fc2 (96 -> 64) and a head (64 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 96), nn.Linear(96, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.relu(self.fc1(x))).mean(1))


X = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))


def test_defaults_and_json_round_trip() -> None:
    recipe = fxprune.Recipe.load(_stage(target={"flops": 0.25}, block=16, criterion="dimap", modules=["*.fc*"],
                                        ignore=["head"], max_sparsity=0.8, calibration_batches=4,
                                        latency=0.5))
    stage = recipe.stages[0]
    assert isinstance(stage, BlockSparseStage) and stage.block == [16, 16] and stage.rewrites_graph
    again = fxprune.Recipe.from_dict(json.loads(recipe.to_json()))
    assert again.to_dict() == recipe.to_dict()
    default = fxprune.Recipe.load(_stage()).stages[0]
    assert (default.target, default.block, default.criterion) == ({"sparsity": 0.5}, [32, 32], "lpvit")
    rect = fxprune.Recipe.load(_stage(block=[64, 32])).stages[0]
    assert rect.block_shape == (64, 32)


@pytest.mark.parametrize("fields, path", [
    ({"block": [32]}, "stages[0].block"),
    ({"block": [0, 32]}, "stages[0].block"),
    ({"block": "32x32"}, "stages[0].block"),
    ({"block": [32, 32.5]}, "stages[0].block"),
    ({"block": True}, "stages[0].block"),
    ({"criterion": "lpvt"}, "stages[0].criterion"),
    ({"criterion": "taylor"}, "stages[0].criterion"),
    ({"target": {"params": 0.5}}, "stages[0].target.params"),
    ({"target": {"sparsity": 1.0}}, "stages[0].target.sparsity"),
    ({"target": {"flops": 0.5, "sparsity": 0.5}}, "stages[0].target"),
    ({"modules": "blocks.*"}, "stages[0].modules"),
    ({"ignore": [3]}, "stages[0].ignore"),
    ({"max_sparsity": 1.0}, "stages[0].max_sparsity"),
    ({"calibration_batches": 0}, "stages[0].calibration_batches"),
    ({"blocks": [32, 32]}, "stages[0].blocks"),
    ({"latency": -1}, "stages[0].latency"),
    ({"latency": "fast"}, "stages[0].latency"),
])
def test_bad_fields_name_the_field(fields: dict, path: str) -> None:
    with pytest.raises(RecipeError) as info:
        fxprune.Recipe.load(_stage(**fields))
    assert info.value.field == path


def test_unknown_criterion_suggests_the_close_name() -> None:
    with pytest.raises(RecipeError, match="did you mean 'lpvit'"):
        fxprune.Recipe.load(_stage(criterion="lpvt"))


def test_blocksparse_must_come_after_channel_stages() -> None:
    with pytest.raises(RecipeError) as info:
        fxprune.Recipe.load({"stages": [{"kind": "blocksparse"}, {"kind": "channels"}]})
    assert info.value.field == "stages[1].kind"


def test_block_not_tiling_a_named_module_names_it() -> None:
    model = MLP().eval()
    with pytest.raises(RecipeError, match=r"block 32x64 does not tile module 'fc2' \(weight 64x96\)"):
        fxprune.compile(model, _stage(block=[32, 64], modules=["fc*"]), example_inputs=X)
    # by default layers the block does not tile are simply left dense
    pruned = fxprune.compile(model, _stage(block=[32, 64], criterion="l2"), example_inputs=X)
    assert set(pruned.fxprune_plan.rewrites[0]["layers"]) == {"fc1"}  # fc2 is not tiled; the head is kept


def test_modules_pattern_matching_nothing() -> None:
    with pytest.raises(RecipeError, match="pattern 'blocks.*' matches no nn.Linear"):
        fxprune.compile(MLP().eval(), _stage(modules=["blocks.*"]), example_inputs=X)


def test_nothing_to_prune() -> None:
    with pytest.raises(RecipeError, match="no nn.Linear layer to prune"):
        fxprune.compile(MLP().eval(), _stage(block=[64, 64], ignore=["fc2"]), example_inputs=X)


def test_unreachable_budget_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match="blocksparse target"):
        fxprune.compile(MLP().eval(), _stage(target={"flops": 0.95}, criterion="l2"), example_inputs=X)


def test_head_is_pruned_only_when_named() -> None:
    model = MLP().eval()
    pruned = fxprune.compile(model, _stage(block=[2, 32], criterion="l2", modules=["head", "fc1"]), example_inputs=X)
    assert set(pruned.fxprune_plan.rewrites[0]["layers"]) == {"head", "fc1"}


def _entry(model: nn.Module) -> dict:
    return fxprune.compile(model, _stage(block=[32, 32], criterion="l2"), example_inputs=X).fxprune_plan.rewrites[0]


@pytest.mark.parametrize("damage, match", [
    (lambda e: e["layers"].update({"fc9": e["layers"]["fc1"]}), "module 'fc9', which this model does not have"),
    (lambda e: e["layers"]["fc1"].update(shape=[96, 32]), "expects module 'fc1' of weight shape"),
    (lambda e: e["layers"]["fc1"].update(block=[40, 32]), "block 40x32 does not tile module 'fc1'"),
    (lambda e: e["layers"]["fc1"]["kept"][0].append(7), "block row 0: kept columns"),
    (lambda e: e["layers"]["fc1"]["kept"].pop(), "each of its 3 block rows"),
])
def test_bad_plan_entries_name_the_module(damage, match: str) -> None:
    model = MLP().eval()
    entry = copy.deepcopy(_entry(model))
    damage(entry)
    gm = fxprune.trace(copy.deepcopy(model))
    fxprune.record_shapes(gm, (X,))
    with pytest.raises(PlanError, match=match):
        replay_blocksparse(gm, entry, (X,))
    assert all(type(m) is not fxprune.nn.BlockSparseLinear for m in gm.modules())  # nothing swapped on failure


def test_replay_rejects_a_swapped_module() -> None:
    model = MLP().eval()
    pruned = fxprune.compile(model, _stage(block=[32, 32], criterion="l2"), example_inputs=X)
    with pytest.raises(PlanError, match="a BlockSparseLinear, not an nn.Linear"):
        replay_blocksparse(pruned, pruned.fxprune_plan.rewrites[0], (X,))


class _QuantizableLinear(nn.Linear):
    """A subclass that keeps ``nn.Linear.forward`` (like torch's ``NonDynamicallyQuantizableLinear``)."""


class _OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_linear_subclasses_with_linear_forward_are_pruned() -> None:
    model = MLP().eval()
    model.fc1 = _QuantizableLinear(64, 96)
    model.fc2 = _OwnForward(96, 64)
    recipe = {**_stage(block=[32, 32], criterion="l2"), "leaf_modules": ["fc2"]}  # fc2 stays one call_module node
    pruned = fxprune.compile(model, recipe, example_inputs=X)
    assert any(n.op == "call_module" and n.target == "fc2" for n in pruned.graph.nodes)
    assert set(pruned.fxprune_plan.rewrites[0]["layers"]) == {"fc1"}  # fc2 computes something else: left alone
