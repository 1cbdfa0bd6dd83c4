"""``fxprune.stages.base``: validation changes nothing, parsed recipes hold normalized copies, and a stage kind
registered from outside fxprune runs through ``fxprune.compile`` like the built-in ones."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxprune
from fxprune.criteria import ScoreContext
from fxprune.plan import Plan
from fxprune.stages import BlockSparseStage, ChannelStage, PatchStage, Stage, base, register_stage


def test_validate_changes_no_field_and_recipes_hold_normalized_copies() -> None:
    stages = [ChannelStage(target={"flops": 0}), BlockSparseStage(block=16, latency=1, criterion="l2"),
              PatchStage(keep=1)]
    before = copy.deepcopy(stages)
    for i, stage in enumerate(stages):
        stage.validate(f"stages[{i}]")
    assert stages == before and type(stages[1].block) is int and type(stages[2].keep) is int
    recipe = fxprune.Recipe(stages=stages)
    assert stages == before  # the user's objects are untouched
    channels, blocks, patches = recipe.stages
    assert type(channels.target["flops"]) is float and blocks.block == [16, 16] and blocks.block_shape == (16, 16)
    assert type(blocks.latency) is float and type(patches.keep) is float and patches.keep == 1.0
    assert fxprune.Recipe.from_dict(recipe.to_dict()) == recipe


def test_a_stage_registered_outside_fxprune_runs_in_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_STAGES", dict(base._STAGES))  # the registration ends with the test
    seen: list[tuple[int, str]] = []

    @register_stage("test_count_nodes")
    @dataclass
    class CountNodes(Stage):
        label: str = "nodes"

        def validate(self, path: str) -> None:
            if not isinstance(self.label, str):
                raise fxprune.RecipeError(f"{path}.label", "must be a string")

        def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
            seen.append((len(gm.graph.nodes), self.label))
            return Plan(stats={self.label: float(len(gm.graph.nodes))})

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    recipe = {"stages": [{"kind": "channels", "target": {"sparsity": 0.5}}, {"kind": "test_count_nodes"}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x)
    assert seen == [(5, "nodes")] and pruned.fxprune_plan.stats["nodes"] == 5.0  # input, 3 modules, output
    assert pruned.get_submodule("0").out_channels == 4 and CountNodes.kind == "test_count_nodes"
    with pytest.raises(fxprune.RecipeError) as info:
        fxprune.Recipe.load({"stages": [{"kind": "test_count_nodes", "label": 3}]})
    assert info.value.field == "stages[0].label"
    assert fxprune.Recipe.load({"stages": [{"kind": "test_count_nodes"}]}).to_dict()["stages"] == [
        {"kind": "test_count_nodes", "label": "nodes"}]


def test_register_stage_takes_stage_dataclasses_only() -> None:
    with pytest.raises(TypeError, match="must be a dataclass subclassing fxprune.stages.Stage"):
        register_stage("test_not_a_stage")(type("NotAStage", (), {}))
    assert "test_not_a_stage" not in base.stage_kinds()
