"""The ``recover`` field: validation errors naming ``stages[i].recover``, the missing-data error, recipe round
trips, and recovery on the ``heads`` and ``iterative`` stages (checked against references computed by hand)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from fixtures import ResCatNet
from torch import nn

import fxprune
from fxprune.errors import FxPruneError, RecipeError

torch.manual_seed(0)


@pytest.mark.parametrize("value, path, words", [
    ("bn", "stages[0].recover", "must be a list"),
    (["bn", "fold"], "stages[0].recover[1]", "unknown recovery method"),
    (["bias", "bias"], "stages[0].recover[1]", "listed twice"),
    ([{"lstsq": {"ridge": -1}}], "stages[0].recover[0].lstsq.ridge", ">= 0"),
    ([{"lstsq": {"passes": 1.5}}], "stages[0].recover[0].lstsq.passes", "integer"),
    ([{"lstsq": {"rank": 2}}], "stages[0].recover[0].lstsq.rank", "unknown option"),
    ([{"lstsq": {"products": "half"}}], "stages[0].recover[0].lstsq.products", "'float32' or 'float64'"),
    ([{"bn": {}}], "stages[0].recover[0]", "takes no options"),
])
def test_bad_values_name_the_field(value: object, path: str, words: str) -> None:
    with pytest.raises(RecipeError) as err:
        fxprune.Recipe.load({"stages": [{"target": {"flops": 0.3}, "recover": value}]})
    assert path in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("kind", ["heads", "iterative"])
def test_other_stage_kinds_validate_the_field(kind: str) -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.recover\[0\]"):
        fxprune.Recipe.load({"stages": [{"kind": kind, "target": {"flops": 0.3}, "recover": ["bm"]}]})


@pytest.mark.parametrize("kind", ["channels", "heads", "head_dim", "iterative"])
def test_round_trip_and_default_form(kind: str) -> None:
    methods = ["bn", {"lstsq": {"passes": 0}}]
    recipe = fxprune.Recipe.load({"stages": [{"kind": kind, "target": {"flops": 0.3}, "recover": methods}]})
    again = fxprune.Recipe.load(recipe.to_json())
    assert again.stages[0].recover == methods and again.stages[0].writes_weights()
    assert json.loads(recipe.to_json())["stages"][0]["recover"] == methods
    plain = fxprune.Recipe.load({"stages": [{"kind": kind, "target": {"flops": 0.3}}]})
    assert "recover" not in plain.to_dict()["stages"][0] and not plain.stages[0].writes_weights()


def test_validate_never_changes_the_field() -> None:
    stage = fxprune.stages.ChannelStage(recover=["lstsq", "bn"])
    stage.validate("stages[0]")
    assert stage.recover == ["lstsq", "bn"]  # listed order kept; they still run as bias, lstsq, bn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("stage", [{"kind": "channels"}, {"kind": "heads"},
                                   {"kind": "iterative", "target": {"flops": 0.3}}])
def test_without_data_the_usual_error(stage: dict) -> None:
    recipe = {"stages": [{**stage, "recover": ["bias"]}]}
    with pytest.raises(FxPruneError, match=r"stages\[0\]\.recover .* needs data: pass fxprune\.compile\(\.\.\., data="):
        fxprune.compile(MLP().eval(), recipe, example_inputs=torch.randn(2, 6), evaluate=lambda m: 1.0)


class Attn(nn.Module):
    """Linear q/k/v, 4 heads of 4, matmul attention, then ``proj`` and a head (the digits ViT's attention)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.head = nn.Linear(dim, 3)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = (f(x).reshape(b, n, h, d).permute(0, 2, 1, 3) for f in (self.q, self.k, self.v))
        a = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d)), dim=-1)
        return torch.matmul(a, v).permute(0, 2, 1, 3).reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.proj(self.attention(x))).mean(1)


def test_heads_stage_refits_the_output_projection() -> None:
    model = Attn().eval()
    data = [torch.randn(4, 5, 16) for _ in range(3)]
    recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}, "recover": [{"lstsq": {"ridge": 0.0}}]}]}
    pruned = fxprune.compile(model, recipe, example_inputs=data[0][:1], data=data)
    kept = pruned.fxprune_plan.kept["@proj:0:1"]
    assert len(kept) == 8  # two whole heads of four features
    with torch.no_grad():
        att = torch.cat([model.attention(x) for x in data]).reshape(-1, 16).double().numpy()
        y = torch.cat([model.proj(model.attention(x)) for x in data]).reshape(-1, 16).double().numpy()
    want = scipy.linalg.lstsq(np.hstack([att[:, kept], np.ones((len(att), 1))]), y)[0]
    np.testing.assert_allclose(pruned.proj.weight.detach().double().numpy(), want[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pruned.proj.bias.detach().double().numpy(), want[-1], rtol=1e-4, atol=1e-5)


def test_iterative_stage_recovers_after_its_step() -> None:
    model = MLP().eval()
    data = [torch.randn(16, 6) + 0.5 for _ in range(2)]
    recipe = {"stages": [{"kind": "iterative", "target": {"params": 0.1}, "rates": [0.5], "layers_per_step": 1,
                          "steps": 1, "recover": ["bias"]}]}
    pruned = fxprune.compile(model, recipe, example_inputs=data[0][:2], data=data, evaluate=lambda m: 1.0)
    plan = pruned.fxprune_plan.kept
    (layer,) = {k.split(":")[0][1:] for k in plan if k.startswith("@fc") and k.endswith(":0:0")}  # one group pruned
    consumer = {"fc1": "fc2", "fc2": "fc3"}[layer]
    removed = sorted(set(range(12)) - set(plan[f"@{layer}:0:0"]))
    with torch.no_grad():
        x = torch.cat(data)
        h = torch.relu(model.fc1(x)) if layer == "fc1" else torch.relu(model.fc2(torch.relu(model.fc1(x))))
        w = getattr(model, consumer).weight
        want = getattr(model, consumer).bias + w[:, removed] @ h[:, removed].mean(0)
    torch.testing.assert_close(getattr(pruned, consumer).bias.detach(), want, rtol=1e-5, atol=1e-6)


def test_recover_off_keeps_masked_equal_to_shrunk() -> None:
    model, x = MLP().eval(), torch.randn(3, 6)
    pruned = fxprune.testing.prune_and_check(model, {"stages": [{"target": {"sparsity": 0.5}, "recover": []}]}, x)
    assert pruned.fxprune_plan.kept


def test_recover_on_changes_only_consumers() -> None:
    model, data = MLP().eval(), [torch.randn(8, 6) for _ in range(2)]
    recipe = {"stages": [{"target": {"sparsity": 0.5}, "recover": ["bias", "lstsq"]}]}
    pruned = fxprune.compile(model, recipe, example_inputs=data[0][:2], data=data)
    kept = pruned.fxprune_plan.kept["@fc1:0:0"]
    assert torch.equal(pruned.fc1.weight, model.fc1.weight[kept])  # a producer only: never refit
    assert not torch.equal(pruned.fc3.weight, model.fc3.weight[:, pruned.fxprune_plan.kept["@fc3:0:1"]])
    assert F.mse_loss(pruned(data[0]), model(data[0])) < F.mse_loss(
        fxprune.compile(model, {"stages": [{"target": {"sparsity": 0.5}}]}, example_inputs=data[0][:2])(data[0]),
        model(data[0]))


def test_recovery_never_writes_into_the_users_model() -> None:
    """``compile`` otherwise works on a copy that aliases the model's weights until they shrink: recovery's in-place
    writes (BatchNorm statistics and biases of layers that keep their shape) must not reach the user's model."""
    torch.manual_seed(0)
    model = ResCatNet(width=8, fuse=16, classes=3).train()
    with torch.no_grad():  # running statistics of another distribution than the calibration batches
        model(torch.randn(8, 3, 6, 6) * 1.5 + 0.5)
    model.eval()
    data = [torch.randn(6, 3, 6, 6) for _ in range(3)]
    before = fxprune.testing.state_digest(model)
    recipe = {"stages": [{"target": {"flops": 0.4}, "ignore": ["fuse"], "recover": ["bn", "bias", "lstsq"]}]}
    pruned = fxprune.compile(model, recipe, example_inputs=data[0][:1], data=data)
    assert fxprune.testing.state_digest(model) == before
    same_shape = [n for n, m in pruned.named_modules() if isinstance(m, nn.BatchNorm2d)
                  and m.running_mean.shape == model.get_submodule(n).running_mean.shape]
    # a BatchNorm that kept its shape (its buffers were the model's before shrinking) was re-estimated
    assert any(not torch.equal(pruned.get_submodule(n).running_mean, model.get_submodule(n).running_mean)
               for n in same_shape)


def test_heads_recovery_never_writes_into_the_users_model() -> None:
    model = Attn().eval()
    data = [torch.randn(4, 5, 16) for _ in range(3)]
    before = fxprune.testing.state_digest(model)
    recipe = {"stages": [{"kind": "heads", "target": {"sparsity": 0.5}, "recover": ["bn", "bias", "lstsq"]}]}
    pruned = fxprune.compile(model, recipe, example_inputs=data[0][:1], data=data)
    assert fxprune.testing.state_digest(model) == before
    assert not torch.equal(pruned.proj.bias, model.proj.bias)  # refit in place: proj keeps its output shape
