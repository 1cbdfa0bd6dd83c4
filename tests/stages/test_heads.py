"""The ``heads`` stage: only whole attention heads go, at least one per layer; targets, round_to, scope, recipe
validation and JSON round trip, and a clear error on models without attention."""
from __future__ import annotations

import pytest
import torch
from fixtures import ResCatNet
from timm.models.vision_transformer import Attention
from torch import nn

import fxprune
from fxprune.errors import BudgetError, RecipeError
from fxprune.stages.heads import HeadStage
from fxprune.testing import prune_and_check
from fxprune.work import count_work


class Block(nn.Module):
    """A pre-norm ViT block from timm's ``Attention`` plus an MLP: heads and MLP hidden are both prunable."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.b0, self.b1 = Block(heads=4), Block(heads=8)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b1(self.b0(self.embed(x))).mean(1))


X = torch.randn(2, 6, 8)


def heads_recipe(target: dict, **fields) -> dict:
    return {"stages": [{"kind": "heads", "target": target, **fields}]}


def kept_heads(pruned: nn.Module, block: str, head_dim: int) -> int:
    return pruned.get_submodule(f"{block}.attn.qkv").out_features // (3 * head_dim)


def test_heads_stage_removes_heads_only() -> None:
    model = TwoBlocks().eval()
    pruned = prune_and_check(model, heads_recipe({"sparsity": 0.5}), X)
    assert kept_heads(pruned, "b0", 8) == 2 and kept_heads(pruned, "b1", 4) == 4
    assert pruned.b0.attn.proj.in_features == 16 and pruned.b1.attn.proj.in_features == 16
    assert pruned.b0.fc1.out_features == 64 and pruned.b1.fc1.out_features == 64  # MLPs untouched
    assert pruned.embed.out_features == 32
    heads_const = [n.args[4] for n in pruned.graph.nodes if n.target == "reshape" and len(n.args) == 6]
    assert heads_const == [2, 4]  # the num_heads constants of the (B, N, 3, H, D) reshapes


@pytest.mark.parametrize("scope", ["local", "global"])
def test_at_least_one_head_per_layer_is_kept(scope: str) -> None:
    pruned = prune_and_check(TwoBlocks().eval(), heads_recipe({"sparsity": 0.95}, max_sparsity=0.99, scope=scope), X)
    assert kept_heads(pruned, "b0", 8) >= 1 and kept_heads(pruned, "b1", 4) >= 1


def test_round_to_counts_heads() -> None:
    pruned = prune_and_check(TwoBlocks().eval(), heads_recipe({"sparsity": 0.75}, round_to=2), X)
    assert kept_heads(pruned, "b0", 8) == 2 and kept_heads(pruned, "b1", 4) == 2  # 1 -> 2 and 2 -> 2


def test_flops_target_is_met_by_heads_alone() -> None:
    model = TwoBlocks().eval()
    pruned = prune_and_check(model, heads_recipe({"flops": 0.2}, criterion="l1"), X)
    ratio = count_work(pruned, X)["macs"] / count_work(model, X)["macs"]
    assert 0.7 <= ratio <= 0.8 + 1e-6
    assert pruned.b0.fc1.out_features == 64


def test_taylor_scores_heads_with_data() -> None:
    model = TwoBlocks().eval()
    pruned = fxprune.compile(model, heads_recipe({"sparsity": 0.5}, criterion="taylor"), example_inputs=X, data=[X])
    fxprune.testing.assert_masked_equals_shrunk(model, pruned.fxprune_plan, (X,), pruned)
    assert kept_heads(pruned, "b0", 8) == 2


def test_heads_then_channels_compose() -> None:
    model = TwoBlocks().eval()
    recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}},
                         {"kind": "channels", "target": {"flops": 0.3}}]}
    pruned = prune_and_check(model, recipe, X)
    assert pruned.b0.fc1.out_features < 64 and kept_heads(pruned, "b0", 8) <= 2


def test_model_without_attention_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match="no prunable"):
        fxprune.compile(ResCatNet().eval(), heads_recipe({"sparsity": 0.5}), example_inputs=torch.randn(1, 3, 8, 8))


def test_recipe_validation_and_round_trip() -> None:
    recipe = fxprune.Recipe.load(heads_recipe({"flops": 0.4}, criterion="l1", round_to=2, scope="global"))
    stage = recipe.stages[0]
    assert isinstance(stage, HeadStage) and stage.target == {"flops": 0.4}
    again = fxprune.Recipe.from_dict(recipe.to_dict())
    assert again.to_json() == recipe.to_json()
    for bad, field in [({"scope": "module"}, "stages[0].scope"), ({"round_to": 0}, "stages[0].round_to"),
                       ({"criterion": "l3"}, "stages[0].criterion"), ({"heads": 2}, "stages[0].heads")]:
        with pytest.raises(RecipeError) as info:
            fxprune.Recipe.load(heads_recipe({"sparsity": 0.5}, **bad))
        assert field in str(info.value)
    with pytest.raises(RecipeError, match="stages\\[0\\].target"):
        fxprune.Recipe.load(heads_recipe({"sparsity": 1.5}))


def head_dim_plan(pruned: nn.Module) -> fxprune.Plan:
    """The ``head_dim`` rewrite entry of a plan as a channel plan, for the masked == shrunk oracle."""
    entry = next(e for e in pruned.fxprune_plan.rewrites if e["pass"] == "head_dim")
    return fxprune.Plan(entry["kept"], entry["sizes"])


def test_head_dim_stage_shrinks_features_of_every_head_with_the_scale_pinned() -> None:
    model = TwoBlocks().eval()
    pruned = fxprune.compile(model, heads_recipe({"sparsity": 0.5}, kind="head_dim"), example_inputs=X)
    fxprune.testing.assert_masked_equals_shrunk(model, head_dim_plan(pruned), (X,), pruned)
    splits = [n for n in pruned.graph.nodes if n.target == "reshape" and len(n.args) == 6]
    assert [n.args[4:] for n in splits] == [(4, 4), (8, 2)]  # heads kept, head dims 8 -> 4 and 4 -> 2
    sdpa = [n for n in pruned.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert [n.kwargs["scale"] for n in sdpa] == pytest.approx([8 ** -0.5, 4 ** -0.5])
    assert pruned.b0.fc1.out_features == 64 and pruned.fxprune_plan.kept == {}


class MHABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(8, 32), nn.Linear(32, 5)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_head_dim_stage_on_multihead_attention() -> None:
    model = MHABlock().eval()
    pruned = fxprune.compile(model, heads_recipe({"sparsity": 0.5}, kind="head_dim"), example_inputs=X)
    fxprune.testing.assert_masked_equals_shrunk(model, head_dim_plan(pruned), (X,), pruned)
    attn = pruned.attn
    assert (attn.num_heads, attn.qk_dim, attn.v_dim, attn.in_dim) == (4, 4, 4, 32)


def test_head_dim_must_come_after_channel_stages() -> None:
    with pytest.raises(RecipeError, match="stages\\[1\\].kind"):
        fxprune.Recipe.load({"stages": [{"kind": "head_dim"}, {"kind": "heads"}]})
