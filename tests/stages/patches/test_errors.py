"""Bad input to the patches stage: each error names the recipe field, node or proposal at fault, and the user's
model is never modified. Also: the stage round-trips through JSON and registered proposals are copied, not used."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fxprune
from fxprune import PlanError, RecipeError
from fxprune.stages.patches import PatchStage, register_proposal
from fxprune.stages.patches.proposal import build_proposal
from fxprune.testing import state_digest


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=4).eval()


def _recipe(**fields) -> dict:
    return {"stages": [{"kind": "patches", "proposal": "tests:tiny", **fields}]}


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, True, "half", None])
def test_keep_outside_unit_interval(keep, tiny_proposal) -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.keep.*\(0, 1\]"):
        fxprune.Recipe.load(_recipe(keep=keep))


def test_unknown_proposal_names_the_field_and_suggests() -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.proposal.*unknown proposal 'no_such_net'.*register_proposal"):
        fxprune.Recipe.load({"stages": [{"kind": "patches", "proposal": "no_such_net"}]})
    with pytest.raises(RecipeError, match=r"did you mean 'torchvision:mobilenet_v3_small'"):
        fxprune.Recipe.load({"stages": [{"kind": "patches", "proposal": "torchvision:mobilenet_v3_smal"}]})


def test_unknown_field_and_bad_where() -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.keeep.*did you mean 'keep'"):
        fxprune.Recipe.load({"stages": [{"kind": "patches", "keeep": 0.5}]})
    with pytest.raises(RecipeError, match=r"stages\[0\]\.where"):
        fxprune.Recipe.load({"stages": [{"kind": "patches", "where": ""}]})


def test_model_without_position_embedding(tiny_proposal) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    before = state_digest(model)
    with pytest.raises(PlanError, match="no patch-embedding convolution found.*no channels-last MLP"):
        fxprune.compile(model, _recipe(), example_inputs=torch.randn(1, 3, 32, 32))
    assert state_digest(model) == before

    class PatchNoPos(nn.Module):  # a patch embedding, but no position embedding and no channels-last MLP
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Conv2d(3, 8, 8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x).flatten(2).transpose(1, 2).mean(1))

    with pytest.raises(PlanError, match=r"no position embedding found after the patch embedding %embed"):
        fxprune.compile(PatchNoPos(), _recipe(where="pos_embed"), example_inputs=torch.randn(1, 3, 32, 32))
    with pytest.raises(PlanError, match="no channels-last MLP found"):
        fxprune.compile(PatchNoPos(), _recipe(where="mlp"), example_inputs=torch.randn(1, 3, 32, 32))


def test_where_names_a_missing_or_wrong_node(tiny_proposal) -> None:
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(PlanError, match="no node named 'nope'"):
        fxprune.compile(_vit(), _recipe(where="nope"), example_inputs=x)
    with pytest.raises(PlanError, match=r"%conv_proj.*does not produce a \(B, N, D\) token sequence"):
        fxprune.compile(_vit(), _recipe(where="conv_proj"), example_inputs=x)


def test_explicit_where_node_equals_auto(tiny_proposal) -> None:
    x = torch.randn(2, 3, 32, 32)
    auto = fxprune.compile(_vit(), _recipe(keep=0.5), example_inputs=x)
    named = fxprune.compile(_vit(), _recipe(keep=0.5, where="encoder_dropout"), example_inputs=x)
    assert named.fxprune_plan.rewrites[0]["node"] == "encoder_dropout"
    with torch.no_grad():
        torch.testing.assert_close(named(x), auto(x), atol=1e-6, rtol=1e-6)


def test_proposal_that_is_not_a_feature_map() -> None:
    register_proposal("tests:pooled", nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(ValueError, match=r"proposal 'tests:pooled'.*returned \(1, 4\).*\(B, C', h, w\) feature map"):
        fxprune.compile(_vit(), _recipe(proposal="tests:pooled"), example_inputs=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="must be non-empty strings not starting with 'torchvision:'"):
        register_proposal("torchvision:mine", nn.Identity())
    with pytest.raises(TypeError, match="needs an nn.Module or a zero-argument factory"):
        register_proposal("tests:bad", 3)


def test_patches_must_come_after_channel_stages(tiny_proposal) -> None:
    with pytest.raises(RecipeError, match=r"stages\[1\]\.kind.*must come before the 'patches' stage"):
        fxprune.Recipe.load({"stages": [{"kind": "patches", "proposal": "tests:tiny"}, {"kind": "channels"}]})


def test_replaying_on_another_architecture_fails_clearly(tiny_proposal) -> None:
    pruned = fxprune.compile(_vit(), _recipe(), example_inputs=torch.randn(1, 3, 32, 32))
    other = torchvision.models.VisionTransformer(image_size=64, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=4).eval()
    gm = fxprune.trace(other)
    x = torch.randn(1, 3, 64, 64)
    fxprune.record_shapes(gm, (x,))
    from fxprune.passes.replay import apply_plan

    with pytest.raises(PlanError, match=r"expects a \[4, 4\] patch grid.*the graph has \[8, 8\]"):
        apply_plan(gm, pruned.fxprune_plan, (x,))


def test_stage_json_round_trip_and_registered_module_is_copied(tiny_proposal) -> None:
    recipe = fxprune.Recipe.load(_recipe(keep=0.7, where="auto"))
    again = fxprune.Recipe.from_dict(json.loads(recipe.to_json()))
    assert again.stages == recipe.stages and isinstance(again.stages[0], PatchStage)
    assert again.stages[0].keep == 0.7 and PatchStage.rewrites_graph
    made = build_proposal("tests:tiny")
    assert made is not tiny_proposal
    assert all(torch.equal(a, b) for a, b in zip(made.state_dict().values(), tiny_proposal.state_dict().values()))
    register_proposal("tests:factory", lambda: nn.Conv2d(3, 2, 4, 4))
    assert isinstance(build_proposal("tests:factory"), nn.Conv2d)


def test_load_without_the_registered_proposal_says_how_to_fix_it(tmp_path, tiny_proposal) -> None:
    from fxprune.stages.patches import proposal as registry

    x = torch.randn(1, 3, 32, 32)
    register_proposal("tests:ephemeral", registry.build_proposal("tests:tiny"))
    pruned = fxprune.compile(_vit(), _recipe(proposal="tests:ephemeral"), example_inputs=x)
    path = fxprune.save(pruned, tmp_path / "vit.fxp", example_inputs=x)
    del registry._PROPOSALS["tests:ephemeral"]  # a fresh process that never registered it
    with pytest.raises(KeyError, match="unknown proposal 'tests:ephemeral'.*fxprune.stages.patches.register_proposal"):
        fxprune.load(path, _vit)


def test_rotary_position_tables_after_the_gather_are_named(tiny_proposal) -> None:
    """EVA-02 applies rotary embeddings (a per-position table) inside every block: the error names the table."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56).eval()
    before = state_digest(model)
    with pytest.raises(fxprune.errors.RewriteError,
                       match=r"per-position tensor %\w+ of shape \(16, \d+\) \(e.g. rotary position embeddings\)"):
        fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 0.5}]}, example_inputs=torch.randn(1, 3, 56, 56))
    assert state_digest(model) == before
