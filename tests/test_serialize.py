"""fxprune.save / fxprune.load: one safetensors file (plan + leaf modules in the header, pruned weights as tensors)."""
from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import fxprune
from fxprune.demo import DigitsNet
from fxprune.passes.shrink_channels import ShrinkChannels
from fxprune.serialize import read_metadata
from fxprune.testing import state_digest

RECIPE = {"stages": [{"kind": "channels", "target": {"flops": 0.5}, "criterion": "l2"}]}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _pruned(model: nn.Module, x: torch.Tensor = X, recipe: dict = RECIPE) -> nn.Module:
    pruned = fxprune.compile(model, recipe, example_inputs=x)
    with torch.no_grad():  # stands in for fine-tuning: the saved weights are no longer the sliced originals
        for p in pruned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pruned


def _replay(model: nn.Module, plan: fxprune.Plan, x: torch.Tensor, leaf_modules: tuple = ()) -> nn.Module:
    gm = fxprune.trace(copy.deepcopy(model).eval(), leaf_modules)
    fxprune.record_shapes(gm, (x,))
    ShrinkChannels(plan, (x,))(gm)
    return gm


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_round_trip_keeps_outputs_and_finetuned_weights(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    before = state_digest(model)
    pruned = _pruned(model)
    path = fxprune.save(pruned, tmp_path / "m.fxp", example_inputs=X)
    loaded = fxprune.load(path, model, X)
    with torch.no_grad():
        want, got = pruned(X), loaded(X)
        plain = _replay(model, pruned.fxprune_plan, X)(X)  # the plan alone, with the original (un-tuned) weights
    assert torch.equal(got, want)
    assert not torch.allclose(plain, want), "perturbed weights must change the output, or this test proves nothing"
    assert loaded.fxprune_plan.to_dict() == pruned.fxprune_plan.to_dict()
    assert not loaded.training
    assert state_digest(model) == before, "fxprune.load modified the model"  # load deep-copies the instance


def test_constructor_and_stored_input_shapes(resnet18: nn.Module, tmp_path: Path) -> None:
    pruned = _pruned(resnet18)
    fxprune.save(pruned, tmp_path / "sub" / "m.fxp", example_inputs=X)  # parent folders are created
    # a fresh constructor has different random weights: every weight must come from the file
    loaded = fxprune.load(tmp_path / "sub" / "m.fxp", torchvision.models.resnet18)
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
    assert loaded.conv1.out_channels == pruned.conv1.out_channels < 64


def test_file_is_plain_safetensors_without_pickle(resnet18: nn.Module, tmp_path: Path) -> None:
    pruned = _pruned(resnet18)
    path = tmp_path / "m.fxp"
    fxprune.save(pruned, path, example_inputs=X)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, a JSON header, then raw tensor bytes
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == "fxprune.model"
    assert all(v["dtype"] in ("F32", "I64") for k, v in header.items() if k != "__metadata__")
    tensors = load_file(str(path))  # safetensors only: no unpickling anywhere
    state = pruned.state_dict()
    assert set(tensors) == set(state)
    for k, v in state.items():
        assert torch.equal(tensors[k], v), k
    meta = read_metadata(path)
    assert meta["plan"].kept == pruned.fxprune_plan.kept
    assert meta["leaf_modules"] == [] and meta["inputs"] == [{"shape": [2, 3, 32, 32], "dtype": "torch.float32"}]
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # not a pickle / zip archive at all


def test_leaf_modules_travel_with_the_file(tmp_path: Path) -> None:
    model = DigitsNet().eval()
    x = torch.randn(4, 1, 8, 8)
    recipe = {**RECIPE, "leaf_modules": ["narrow"]}
    pruned = _pruned(model, x, recipe)
    assert any(n.op == "call_module" and n.target == "narrow" for n in pruned.graph.nodes)  # one opaque call
    fxprune.save(pruned, tmp_path / "d.fxp", leaf_modules=["narrow"])
    assert read_metadata(tmp_path / "d.fxp")["leaf_modules"] == ["narrow"]
    loaded = fxprune.load(tmp_path / "d.fxp", model, x)
    assert any(n.op == "call_module" and n.target == "narrow" for n in loaded.graph.nodes)  # traced as saved
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_compiled_result_is_unwrapped(resnet18: nn.Module, tmp_path: Path) -> None:
    compiled = fxprune.compile(resnet18, RECIPE, example_inputs=X, backend="eager")
    fxprune.save(compiled, tmp_path / "c.fxp")
    loaded = fxprune.load(tmp_path / "c.fxp", resnet18, X)
    assert loaded.fxprune_plan.kept == compiled.fxprune_plan.kept
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), compiled(X))
    # the model to rebuild on may itself be wrapped (torch.compile, DataParallel): fxprune looks through it
    for wrapped in (torch.compile(resnet18), nn.DataParallel(resnet18)):
        again = fxprune.load(tmp_path / "c.fxp", wrapped, X)
        with torch.no_grad():
            assert torch.equal(again(X), loaded(X))


def test_training_mode_is_restored(tmp_path: Path) -> None:
    model = DigitsNet().train()
    pruned = fxprune.compile(model, RECIPE, example_inputs=torch.randn(4, 1, 8, 8))
    assert pruned.training
    fxprune.save(pruned, tmp_path / "t.fxp", example_inputs=torch.randn(4, 1, 8, 8))
    assert fxprune.load(tmp_path / "t.fxp", DigitsNet().eval()).training


def test_errors_name_the_problem(resnet18: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "m.fxp"
    fxprune.save(_pruned(resnet18), path)
    with pytest.raises(FileNotFoundError, match="missing.fxp"):
        fxprune.load(tmp_path / "missing.fxp", resnet18, X)
    with pytest.raises(fxprune.PlanError, match=r"does not fit ResNet: .*'@?[\w.:]+'"):
        fxprune.load(path, torchvision.models.resnet34, X)  # another architecture: a space differs in size
    with pytest.raises(fxprune.PlanError, match="plan names space '@"):
        fxprune.load(path, torchvision.models.mobilenet_v3_small, X)
    with pytest.raises(fxprune.PlanError, match="module 'fc'"):
        fxprune.load(path, lambda: torchvision.models.resnet18(num_classes=7), X)
    assert isinstance(fxprune.load(path, resnet18), torch.fx.GraphModule)  # save recorded the traced input shapes
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(fxprune.FxPruneError, match="not an fxprune file"):
        fxprune.load(plain, resnet18, X)
    junk = tmp_path / "junk.fxp"
    junk.write_bytes(b"definitely not safetensors" * 4)
    with pytest.raises(fxprune.FxPruneError, match="not an fxprune file"):
        fxprune.load(junk, resnet18, X)
    with pytest.raises(fxprune.FxPruneError, match="returned by fxprune.compile"):
        fxprune.save(resnet18, tmp_path / "unpruned.fxp")
    with pytest.raises(TypeError, match="zero-argument constructor"):
        fxprune.load(path, "resnet18", X)


def test_module_mode_round_trip_returns_the_users_class(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    pruned = fxprune.compile(model, RECIPE, example_inputs=X, output="module")
    with torch.no_grad():  # stands in for fine-tuning
        for p in pruned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = fxprune.save(pruned, tmp_path / "resnet18.fxp")
    assert read_metadata(path)["output"] == "module"
    again = fxprune.load(path, lambda: torchvision.models.resnet18(num_classes=10))
    assert type(again) is torchvision.models.ResNet and again.fxprune_output == "module"
    assert not again.training
    with torch.no_grad():
        torch.testing.assert_close(again(X), pruned(X))
        assert again(torch.randn(1, 3, 48, 48)).shape == (1, 10)  # no shape guard: the model's own forward
