"""Bad input gets a clear error naming the node, module or recipe field, and never modifies the model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from fxprune import BudgetError, ExampleInputsError, FxPruneError, RecipeError, TraceFailure
from fxprune.testing import channel_recipe, prune_and_check, state_digest


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class Untraceable(Net):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.gate(x))


X = torch.randn(2, 3, 8, 8)


def test_untraceable_names_module_and_line_and_leaf_fix() -> None:
    model = Untraceable().eval()
    before = state_digest(model)
    with pytest.raises(TraceFailure) as info:  # by default 'gate' becomes an automatic leaf (tests/capture)
        fxprune.compile(model, {**channel_recipe(0.5), "strict_trace": True}, example_inputs=X)
    msg = str(info.value)
    assert "module 'gate' (Gate)" in msg and "if x.sum() > 0" in msg and "leaf_modules=['gate']" in msg
    assert state_digest(model) == before
    pruned = prune_and_check(model, {**channel_recipe(0.5), "leaf_modules": ["gate"]}, X)  # the suggested fix works
    assert pruned.conv1.out_channels == 8


class Odd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, 1)  # no rule: channels through it are frozen


class WithUnsupported(Net):
    def __init__(self) -> None:
        super().__init__()
        self.odd = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.cumsum(self.odd(x), 1).mean((1, 2, 3))[:, None]


def test_unsupported_op_is_frozen_reported_and_exact() -> None:
    model = WithUnsupported().eval()
    pruned = prune_and_check(model, channel_recipe(0.5), X)
    assert pruned.odd.out_channels == 8  # frozen by cumsum
    assert pruned.conv1.out_channels == 8  # the rest is still pruned
    reasons = [r for g in pruned.fxprune_plan.frozen for r in g["reasons"]]
    assert any("unsupported op" in r and "cumsum" in r for r in reasons)
    assert "cumsum" in str(fxprune.report(model, pruned, X))


def test_invalid_recipe_field_is_named() -> None:
    with pytest.raises(RecipeError, match="'stages\\[0\\].round_to'"):
        fxprune.compile(Net(), {"stages": [{"round_to": -2}]}, example_inputs=X)


@pytest.mark.parametrize("value", [1.0, 1.5, -0.2])
def test_sparsity_outside_unit_interval(value: float) -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\].target.sparsity.*\[0, 1\)"):
        fxprune.compile(Net(), channel_recipe(value), example_inputs=X)


def test_budget_that_cannot_be_met() -> None:
    with pytest.raises(BudgetError, match=r"flops target 0.999 cannot be met: at most 0\.\d+ .*max_sparsity=0.9"):
        fxprune.compile(Net().eval(), channel_recipe(0.999, "flops"), example_inputs=X)
    with pytest.raises(BudgetError, match="no prunable channel group"):
        fxprune.compile(Net().eval(), channel_recipe(0.5, ignore=["conv1", "conv2"]), example_inputs=X)


@pytest.mark.parametrize("inputs, words", [
    (torch.randn(2, 4, 8, 8), "node %conv1"),
    ((X, X), "takes 1..1 inputs"),
    ("image", "tensor or a tuple"),
])
def test_example_inputs_mismatch(inputs: object, words: str) -> None:
    model = Net().eval()
    before = state_digest(model)
    with pytest.raises(ExampleInputsError, match=words):
        fxprune.compile(model, channel_recipe(0.5), example_inputs=inputs)
    assert state_digest(model) == before


def test_nan_weights_and_meta_device() -> None:
    model = Net()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FxPruneError, match="'conv2.weight' holds NaN"):
        fxprune.compile(model, channel_recipe(0.5), example_inputs=X)
    with torch.device("meta"):
        meta = Net()
    with pytest.raises(FxPruneError, match="meta device"):
        fxprune.compile(meta, channel_recipe(0.5), example_inputs=X)


def test_train_mode_model_keeps_mode_and_bn_statistics() -> None:
    model = Net().train()
    before = state_digest(model)
    pruned = fxprune.compile(model, channel_recipe(0.5), example_inputs=X)
    assert model.training and pruned.training
    assert state_digest(model) == before  # BN running stats untouched: tracing runs in eval mode


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        fxprune.compile(lambda x: x, channel_recipe(0.5), example_inputs=X)


def test_torchscript_is_refused_and_wrappers_are_looked_through(caplog) -> None:
    with pytest.raises(TypeError, match=r"TorchScript module.*pass the nn.Module from before torch.jit.script"):
        fxprune.compile(torch.jit.script(Net().eval()), channel_recipe(0.5), example_inputs=X)
    torch.manual_seed(0)
    inner = Net().eval()
    want = fxprune.compile(inner, channel_recipe(0.5), example_inputs=X)
    for wrapped, how in ((torch.compile(inner), "torch.compile"), (nn.DataParallel(inner), "DataParallel")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fxprune.api"):
            got = fxprune.compile(wrapped, channel_recipe(0.5), example_inputs=X)
        assert f"inside {how}" in caplog.text
        assert isinstance(got, torch.fx.GraphModule) and got.fxprune_plan.kept == want.fxprune_plan.kept
        with torch.no_grad():
            assert torch.equal(got(X), want(X))
        # report and count_work look through the wrappers too, on either side
        assert fxprune.report(wrapped, got, X).macs_ratio == fxprune.report(inner, want, X).macs_ratio < 0.9
        assert fxprune.work.count_work(wrapped, X) == fxprune.work.count_work(inner, X)
    compiled = fxprune.compile(inner, channel_recipe(0.5), example_inputs=X, backend="aot_eager")
    assert fxprune.report(inner, compiled, X).macs_ratio == fxprune.report(inner, want, X).macs_ratio


def test_unknown_criterion_lists_available_ones() -> None:
    with pytest.raises(RecipeError, match=r"'stages\[0\].criterion': unknown criterion 'magic'; available: .*l2"):
        fxprune.compile(Net(), channel_recipe(0.5, criterion="magic"), example_inputs=X)


def test_recipe_given_as_yaml_or_json_text() -> None:
    net = Net().eval()
    as_dict = fxprune.compile(net, channel_recipe(0.5), example_inputs=X)
    for text in ("stages: [{kind: channels, target: {sparsity: 0.5}}]",
                 '{"stages": [{"kind": "channels", "target": {"sparsity": 0.5}}]}'):
        assert fxprune.compile(net, text, example_inputs=X).fxprune_plan.kept == as_dict.fxprune_plan.kept
    with pytest.raises(RecipeError, match=r"'stages\[0\]\.target\.flops': must be in \[0, 1\)"):
        fxprune.compile(Net(), "stages: [{target: {flops: 1.5}}]", example_inputs=X)
    long_text = "stages: [" + ", ".join(["{kind: channels, target: {sparsity: 0.1}, criterion: l2}"] * 5) + "]"
    assert len(long_text) > 255  # longer than a file name may be: must not be looked up as one
    assert len(fxprune.Recipe.load(long_text).stages) == 5
    with pytest.raises(RecipeError, match="does not exist"):
        fxprune.Recipe.load("x" * 300)


def test_recipe_file_missing_or_unparsable(tmp_path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        fxprune.compile(Net(), tmp_path / "nope.yaml", example_inputs=X)
    bad = tmp_path / "bad.json"
    bad.write_text('{"stages": [')
    with pytest.raises(RecipeError, match="not valid YAML/JSON"):
        fxprune.compile(Net(), bad, example_inputs=X)


@pytest.mark.parametrize("recipe, inputs, error", [
    ({"stages": [{"round_to": -2}]}, X, RecipeError),
    (channel_recipe(0.999, "flops"), X, BudgetError),
    (channel_recipe(0.5, criterion="magic"), X, RecipeError),
    (channel_recipe(0.5), torch.randn(2, 5, 8, 8), ExampleInputsError),
    (channel_recipe(0.5, criterion="taylor"), X, FxPruneError),  # a data-driven criterion without data
])
def test_no_failure_modifies_the_input_model(recipe: dict, inputs: torch.Tensor, error: type) -> None:
    model = Net().train()
    before = state_digest(model)
    with pytest.raises(error):
        fxprune.compile(model, recipe, example_inputs=inputs)
    assert state_digest(model) == before and model.training
