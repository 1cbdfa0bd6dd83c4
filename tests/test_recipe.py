"""Recipes: validation names the field, round trips through dict/JSON/YAML files, versioning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fxprune import ChannelStage, Recipe, RecipeError


def test_defaults_and_dict_round_trip() -> None:
    r = Recipe.load({"stages": [{"target": {"flops": 0.5}, "criterion": "l1", "ignore": ["fc"], "round_to": 8}]})
    s = r.stages[0]
    assert isinstance(s, ChannelStage) and s.kind == "channels" and s.scope == "local" and s.steps == 1
    assert Recipe.from_dict(json.loads(r.to_json())) == r


@pytest.mark.parametrize("suffix, dump", [(".json", json.dumps), (".yaml", yaml.safe_dump)])
def test_file_round_trip(tmp_path: Path, suffix: str, dump) -> None:
    r = Recipe([ChannelStage(target={"params": 0.3}, scope="global", seed=4)], leaf_modules=["backbone.odd"])
    path = tmp_path / f"recipe{suffix}"
    path.write_text(dump(r.to_dict()))
    assert Recipe.load(path) == r
    assert Recipe.load(str(path)) == r


@pytest.mark.parametrize("stage, field, words", [
    ({"target": {"sparsity": 1.0}}, "stages[0].target.sparsity", "[0, 1)"),
    ({"target": {"sparsity": -0.1}}, "stages[0].target.sparsity", "[0, 1)"),
    ({"target": {"flops": "half"}}, "stages[0].target.flops", "number"),
    ({"target": {"energy": 0.5}}, "stages[0].target.energy", "unknown target"),
    ({"target": {"latency": 1.0}}, "stages[0].target.latency", "[0, 1)"),
    ({"round_to": "fast"}, "stages[0].round_to", "'auto'"),
    ({"round_to": {"@fc:0:0": 0}}, "stages[0].round_to.@fc:0:0", ">= 1"),
    ({"target": {"flops": 0.5, "params": 0.5}}, "stages[0].target", "exactly one"),
    ({"criterion": "l3"}, "stages[0].criterion", "did you mean"),
    ({"scope": "world"}, "stages[0].scope", "'local' or 'global'"),
    ({"round_to": 0}, "stages[0].round_to", ">= 1"),
    ({"steps": 1.5}, "stages[0].steps", ">= 1"),
    ({"max_sparsity": 1.0}, "stages[0].max_sparsity", "(0, 1)"),
    ({"ignore": "fc"}, "stages[0].ignore", "list"),
    ({"sparsity": 0.5}, "stages[0].sparsity", "unknown field"),
    ({"kind": "weights"}, "stages[0].kind", "unknown stage kind"),
])
def test_invalid_fields_are_named(stage: dict, field: str, words: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.load({"stages": [stage]})
    assert info.value.field == field
    assert f"'{field}'" in str(info.value) and words in str(info.value)


def test_unknown_criterion_lists_available() -> None:
    with pytest.raises(RecipeError, match="available: .*bn_scale.*l1.*l2.*random"):
        Recipe.load({"stages": [{"criterion": "nope"}]})


def test_root_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="'stages'"):
        Recipe.load({"stages": []})
    with pytest.raises(RecipeError, match="'version'"):
        Recipe.load({"version": 99, "stages": [{}]})
    with pytest.raises(RecipeError, match="'stagess'.*did you mean 'stages'"):
        Recipe.load({"stagess": [{}]})
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [ {target: ")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(bad)
