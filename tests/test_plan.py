"""Plans: JSON round trip, determinism, composition of steps, replay and validation."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fxprune
from fxprune import Plan, PlanError
from fxprune.passes.shrink_channels import ShrinkChannels
from fxprune.testing import assert_masked_equals_shrunk, channel_recipe

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_plan_json_round_trip_and_determinism(model: torch.nn.Module) -> None:
    a = fxprune.compile(model, channel_recipe(0.4, "flops", scope="global"), example_inputs=X).fxprune_plan
    b = fxprune.compile(model, channel_recipe(0.4, "flops", scope="global"), example_inputs=X).fxprune_plan
    assert a.to_json() == b.to_json()
    assert Plan.from_json(a.to_json()) == a


def test_replaying_a_saved_plan_gives_the_same_model(model: torch.nn.Module, tmp_path) -> None:
    pruned = fxprune.compile(model, channel_recipe(0.5), example_inputs=X)
    pruned.fxprune_plan.save(tmp_path / "plan.json")
    plan = Plan.load(tmp_path / "plan.json")
    replay = fxprune.trace(copy.deepcopy(model))  # a trace shares modules with its root: copy before shrinking
    fxprune.record_shapes(replay, (X,))
    ShrinkChannels(plan, (X,))(replay)
    with torch.no_grad():
        torch.testing.assert_close(replay(X), pruned(X))


def test_steps_compose_into_one_plan_on_original_indices(model: torch.nn.Module) -> None:
    pruned = fxprune.compile(model, channel_recipe(0.5, steps=3), example_inputs=X)
    plan = pruned.fxprune_plan
    assert pruned.layer1.get_submodule("0").conv1.out_channels == 32
    assert_masked_equals_shrunk(model, plan, (X,), pruned)
    assert all(len(v) < plan.sizes[k] for k, v in plan.kept.items())


def test_invalid_plans_are_rejected(model: torch.nn.Module) -> None:
    gm = fxprune.trace(copy.deepcopy(model))
    fxprune.record_shapes(gm, (X,))
    with pytest.raises(PlanError, match="does not have"):
        ShrinkChannels(Plan({"nope:0:1": [0]}, {"nope:0:1": 3}), (X,))(gm)
    with pytest.raises(PlanError, match="part of a coupled unit"):
        ShrinkChannels(Plan({"conv1:0:1": list(range(32))}, {"conv1:0:1": 64}), (X,))(gm)
    with pytest.raises(PlanError, match="frozen"):
        ShrinkChannels(Plan({"x:0:1": [0, 1]}, {"x:0:1": 3}), (X,))(gm)
    with pytest.raises(PlanError, match="not an fxprune plan"):
        Plan.from_json("{}")


def test_plan_rewrites_round_trip_and_compose_order():
    from fxprune.errors import PlanError
    from fxprune.plan import Plan

    channels = Plan({"a:1": [0, 2]}, {"a:1": 4})
    rewrite = Plan(rewrites=[{"pass": "blocksparse", "modules": {"fc": [1]}}])
    both = channels.compose(rewrite)
    assert both.kept == channels.kept and both.rewrites == rewrite.rewrites
    assert Plan.from_json(both.to_json()) == both
    with pytest.raises(PlanError, match="blocksparse"):
        rewrite.compose(channels)


def test_apply_plan_rejects_unknown_rewrite():
    import torch
    from torch import nn

    from fxprune.errors import PlanError
    from fxprune.passes.replay import apply_plan
    from fxprune.plan import Plan
    from fxprune.trace import record_shapes, trace

    gm = trace(nn.Linear(3, 3))
    record_shapes(gm, (torch.randn(2, 3),))
    with pytest.raises(PlanError, match="'nope' is unknown"):
        apply_plan(gm, Plan(rewrites=[{"pass": "nope"}]), (torch.randn(2, 3),))
