"""The ``iterative`` stage (arXiv 2405.03715): sensitivity sweep, selection, fine-tune callbacks, target, oracle."""
from __future__ import annotations

import logging

import pytest
import torch
from fixtures import ResCatNet
from torch import nn

import fxprune
from fxprune.errors import FxPruneError, RecipeError
from fxprune.testing import assert_masked_equals_shrunk
from fxprune.work import count_work


def rescat() -> nn.Module:
    """The shared residual + concat toy at the sizes this file expects."""
    return ResCatNet(width=16, fuse=32, classes=5)


X = torch.randn(2, 3, 8, 8)


def _macs(m: nn.Module) -> int:
    return count_work(m, X)["macs"]


def _recipe(**fields: object) -> dict:
    return {"stages": [{"kind": "iterative", **fields}]}


WIDTHS = {"stem.0": 16, "body.0": 32, "fuse": 32}  # the producer of each prunable group and its width


class Callbacks:
    """Agreement with the unpruned model's predictions; pruning the group produced by ``penalize`` halves it."""

    def __init__(self, model: nn.Module, penalize: str | None = None) -> None:
        self.probe = torch.randn(64, 3, 8, 8)
        with torch.no_grad():
            self.ref = model(self.probe).argmax(1)
        self.penalize = penalize
        self.evaluated = 0
        self.steps: list[int] = []

    def evaluate(self, m: nn.Module) -> float:
        self.evaluated += 1
        with torch.no_grad():
            agree = float((m(self.probe).argmax(1) == self.ref).float().mean())
        hit = self.penalize and m.get_submodule(self.penalize).out_channels < WIDTHS[self.penalize]
        return agree * (0.5 if hit else 1.0)

    def finetune(self, m: nn.Module, step: int) -> None:
        self.steps.append(step)
        with torch.no_grad():
            m.fc.bias.add_(1.0)  # a visible, harmless "training" effect


def _pruned_groups(m: nn.Module) -> set[str]:
    return {name for name, width in WIDTHS.items() if m.get_submodule(name).out_channels < width}


def test_iterative_meets_target_in_steps_and_finetunes_the_pruned_model() -> None:
    model = rescat().eval()
    cb = Callbacks(model)
    recipe = _recipe(target={"flops": 0.5}, rates=[0.4], layers_per_step=1, steps=20)
    pruned = fxprune.compile(model, recipe, example_inputs=X, evaluate=cb.evaluate, finetune=cb.finetune)
    reduction = 1 - _macs(pruned) / _macs(model)
    assert 0.5 <= reduction < 0.55
    assert len(cb.steps) >= 2 and cb.steps == list(range(1, len(cb.steps) + 1))
    assert cb.evaluated >= 3  # every group was evaluated in step 1
    assert torch.allclose(pruned.fc.bias, model.fc.bias + len(cb.steps))  # fine-tuning acted on the pruned model
    assert pruned.fxprune_plan.stats["target_met"] == 1
    finetuned = rescat().eval()
    finetuned.load_state_dict(model.state_dict())
    with torch.no_grad():
        finetuned.fc.bias.add_(len(cb.steps))  # the oracle compares against the same fine-tuned head
    assert_masked_equals_shrunk(finetuned, pruned.fxprune_plan, (X,), pruned)


def test_sensitivity_steers_the_selection() -> None:
    model = rescat().eval()
    recipe = _recipe(target={"flops": 0.1}, layers_per_step=1, steps=1)
    free = Callbacks(model)
    free.evaluate = lambda m: 1.0  # every candidate looks harmless: the biggest saving wins
    chosen = _pruned_groups(fxprune.compile(model, recipe, example_inputs=X, evaluate=free.evaluate))
    assert len(chosen) == 1
    (group,) = chosen
    cb = Callbacks(model, penalize=group)
    pruned = fxprune.compile(model, recipe, example_inputs=X, evaluate=cb.evaluate)
    assert group not in _pruned_groups(pruned) and _pruned_groups(pruned)  # alpha = 20 makes 0.5 decisive
    assert 1 - _macs(pruned) / _macs(model) >= 0.1


def test_iterative_with_params_target_and_stops_when_steps_run_out(caplog: pytest.LogCaptureFixture) -> None:
    model = rescat().eval()
    cb = Callbacks(model)
    recipe = _recipe(target={"params": 0.8}, layers_per_step=1, steps=1, rates=[0.25])
    with caplog.at_level(logging.WARNING, logger="fxprune.iterative"):
        pruned = fxprune.compile(model, recipe, example_inputs=X, evaluate=cb.evaluate, finetune=cb.finetune)
    assert "not met after 1 steps" in caplog.text
    assert pruned.fxprune_plan.stats["target_met"] == 0 and cb.steps == [1]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_iterative_needs_evaluate() -> None:
    with pytest.raises(FxPruneError, match="needs evaluate"):
        fxprune.compile(rescat().eval(), _recipe(), example_inputs=X)


@pytest.mark.parametrize("fields,path", [
    ({"target": {"sparsity": 0.5}}, r"stages\[0\]\.target\.sparsity"),
    ({"rates": [0.5, 1.0]}, r"stages\[0\]\.rates"),
    ({"rates": []}, r"stages\[0\]\.rates"),
    ({"alpha": -1}, r"stages\[0\]\.alpha"),
    ({"layers_per_step": 0}, r"stages\[0\]\.layers_per_step"),
    ({"criterion": "taylr"}, r"stages\[0\]\.criterion.*did you mean 'taylor'"),
    ({"alpah": 3}, r"stages\[0\]\.alpah.*did you mean 'alpha'"),
])
def test_iterative_recipe_validation(fields: dict, path: str) -> None:
    with pytest.raises(RecipeError, match=path):
        fxprune.Recipe.load(_recipe(**fields))


def test_iterative_recipe_round_trips() -> None:
    r = fxprune.Recipe.load(_recipe(target={"flops": 0.6}, rates=[0.3, 0.6], alpha=10))
    again = fxprune.Recipe.load(r.to_dict())
    assert again.stages[0] == r.stages[0] and again.stages[0].kind == "iterative"
