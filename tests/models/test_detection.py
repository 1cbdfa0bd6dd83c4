"""Partial tracing (recipe ``submodule``): prune the traceable backbone of torchvision detectors and segmenters.

The detectors cannot be traced whole (resizing, anchors, NMS); the segmenters can, and are pruned through their
backbone anyway. Every case checks, on the backbone's real inputs (captured from a whole-model run): masked ==
shrunk, MACs down by the recipe's target, and boundary channels kept. Then the whole pruned model runs and returns
the same structure, and equals the whole model with the masked backbone (segmentation: final outputs; detection:
the backbone features inside the whole-model run, since NMS may order ties differently).
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
from fixtures import ResCatNet
from torch import nn
from torchvision.models import detection, segmentation

import fxprune
from fxprune.outputs import tensors_of
from fxprune.submodule import capture_inputs, resolve_submodule, set_submodule
from fxprune.testing import assert_masked_equals_shrunk, masked_model, state_digest
from fxprune.work import count_work

SMALL = {"weights": None, "weights_backbone": None, "num_classes": 3}
DET = {**SMALL, "min_size": 128, "max_size": 128}
# name -> (constructor, image side, is a detector). Detectors take a list of CHW images; the internal resize
# (min_size/max_size; SSDlite always resizes to 320) keeps CPU time small. Segmenters take a batch.
CASES: dict[str, tuple[Callable[[], nn.Module], int, bool]] = {
    "fasterrcnn_resnet50_fpn": (lambda: detection.fasterrcnn_resnet50_fpn(**DET, box_score_thresh=0.0), 128, True),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(**DET, box_score_thresh=0.0), 128, True),
    "retinanet_resnet50_fpn": (lambda: detection.retinanet_resnet50_fpn(**DET, score_thresh=0.0), 128, True),
    "ssdlite320_mobilenet_v3_large": (
        lambda: detection.ssdlite320_mobilenet_v3_large(**SMALL, score_thresh=0.0), 96, True),
    "deeplabv3_mobilenet_v3_large": (lambda: segmentation.deeplabv3_mobilenet_v3_large(**SMALL), 96, False),
    "fcn_resnet50": (lambda: segmentation.fcn_resnet50(**SMALL), 64, False),
    "lraspp_mobilenet_v3_large": (lambda: segmentation.lraspp_mobilenet_v3_large(**SMALL), 96, False),
    # last: the save/load test reuses its cached result (same xdist group)
    "fcos_resnet50_fpn": (lambda: detection.fcos_resnet50_fpn(**DET, score_thresh=0.0), 128, True),
}
FLOPS = 0.5
RECIPE = {"submodule": "backbone", "stages": [{"kind": "channels", "target": {"flops": FLOPS}}]}


def _inputs(side: int, is_detector: bool) -> tuple:
    image = torch.rand(3, side, side)
    return ([image],) if is_detector else (image[None],)


@functools.lru_cache(maxsize=1)
def _pruned(name: str) -> tuple[nn.Module, tuple, nn.Module]:
    """(original model, whole-model inputs, pruned whole model); the original is checked to be untouched."""
    torch.manual_seed(0)
    ctor, side, is_detector = CASES[name]
    model = ctor().eval()
    inputs = _inputs(side, is_detector)
    state = state_digest(model)
    pruned = fxprune.compile(model, RECIPE, example_inputs=inputs)
    assert not isinstance(model.backbone, fx.GraphModule) and not model.backbone._forward_pre_hooks
    assert state_digest(model) == state, f"{name}: compile modified the user's model"
    return model, inputs, pruned


def _features(model: nn.Module, path: str, inputs: tuple) -> tuple[Any, Any]:
    """(whole-model output, output of the submodule at ``path`` during that run), in eval mode."""
    seen = []
    handle = resolve_submodule(model, path).register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        handle.remove()
    return out, seen[0]


def _close(got: Any, want: Any, what: str, tol: float = 1e-3) -> None:
    got, want = tensors_of(got), tensors_of(want)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}[{i}]: {m}")


def _with_masked(model: nn.Module, path: str, plan: fxprune.Plan, sub_inputs: tuple) -> nn.Module:
    """A copy of ``model`` whose submodule ``path`` has the plan's channels zero-masked instead of removed."""
    whole = copy.deepcopy(model)
    set_submodule(whole, path, masked_model(resolve_submodule(whole, path), plan, sub_inputs))
    return whole


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group("detection")) for n in CASES])
def test_scoped_backbone(name: str) -> None:
    model, inputs, pruned = _pruned(name)
    is_detector = CASES[name][2]
    # the whole model comes back, with only the backbone replaced by its pruned GraphModule
    assert type(pruned) is type(model) and not isinstance(pruned, fx.GraphModule)
    assert isinstance(pruned.backbone, fx.GraphModule) and not pruned.training
    assert pruned.fxprune_recipe.submodule == "backbone" and pruned.fxprune_plan.kept
    for child in ("head", "classifier", "roi_heads", "rpn"):
        if hasattr(model, child):
            assert type(getattr(pruned, child)) is type(getattr(model, child))
    # masked == shrunk on the backbone's real inputs (captured from the whole model), boundary shapes kept
    sub_inputs, _ = capture_inputs(model, "backbone", inputs)
    assert_masked_equals_shrunk(model.backbone, pruned.fxprune_plan, sub_inputs, pruned.backbone, atol=1e-3, rtol=1e-3)
    before, after = count_work(model.backbone, *sub_inputs), count_work(pruned.backbone, *sub_inputs)
    removed = 1 - after["macs"] / before["macs"]
    assert FLOPS - 1e-9 <= removed <= FLOPS + 0.01, f"{name}: backbone MACs reduced by {removed:.3f}"
    assert after["params"] < before["params"]
    # the whole model runs and equals the whole model with the backbone masked instead of pruned
    masked = _with_masked(model, "backbone", pruned.fxprune_plan, sub_inputs)
    got, got_features = _features(pruned, "backbone", inputs)
    want, want_features = _features(masked, "backbone", inputs)
    _close(got_features, want_features, f"{name} backbone features")
    original = _features(model, "backbone", inputs)[0]
    if is_detector:  # detections: one dict per image; their number depends on the weights (and NMS ties)
        assert isinstance(got, list) and len(got) == len(original) == 1
        assert set(got[0]) == set(original[0]) == {"boxes", "scores", "labels"}
        n = got[0]["boxes"].shape[0]
        assert n > 0 and got[0]["boxes"].shape == (n, 4) and got[0]["scores"].shape == got[0]["labels"].shape == (n,)
    else:  # segmentation: same keys and shapes, and the same values as with the masked backbone
        assert list(got) == list(original) == ["out"]
        assert got["out"].shape == original["out"].shape == (1, 3, CASES[name][1], CASES[name][1])
        _close(got, want, f"{name} whole-model output")


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large"])
def test_segmenters_also_trace_whole(name: str) -> None:
    """Unlike the detectors, the segmenters trace whole (they need no scope; it is tested above anyway)."""
    assert isinstance(fxprune.trace(CASES[name][0]()), fx.GraphModule)


def test_detectors_do_not_trace_whole() -> None:
    with pytest.raises(fxprune.TraceFailure, match="FCOS"):
        fxprune.trace(CASES["fcos_resnet50_fpn"][0]())


def test_fcos_groupnorm_tower_called_per_level() -> None:
    """A submodule called once per FPN level: FCOS's classification tower (conv + GroupNorm + ReLU) x 4.

    The first call's inputs drive the plan; GroupNorm loses whole groups (its statistics stay exact), so every
    level's logits equal those of the masked tower, and the tower's 256 output channels are kept.
    """
    torch.manual_seed(0)
    model = detection.fcos_resnet50_fpn(**DET, score_thresh=0.0).eval()
    inputs = _inputs(128, True)
    path = "head.classification_head.conv"
    recipe = {"submodule": path, "stages": [{"target": {"sparsity": 0.5}}]}
    pruned = fxprune.compile(model, recipe, example_inputs=inputs)
    tower = resolve_submodule(pruned, path)
    norms = [m for m in tower.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_channels == 128 and m.num_groups == 16 for m in norms[:3])
    assert norms[3].num_channels == 256  # the tower's output feeds the logits conv: boundary kept
    calls = []  # the tower's input at every FPN level, from a run of the original model
    original = resolve_submodule(model, path)
    handle = original.register_forward_pre_hook(lambda _m, args: calls.append(args))
    with torch.no_grad():
        model(*inputs)
    handle.remove()
    assert len(calls) == 5 and len({c[0].shape[-1] for c in calls}) == 5
    for level in calls:  # the masks of the masked model are shape-specific: one oracle per level
        assert_masked_equals_shrunk(original, pruned.fxprune_plan, level, tower)
    with torch.no_grad():
        out = pruned(*inputs)
    assert set(out[0]) == {"boxes", "scores", "labels"} and out[0]["boxes"].shape[1] == 4


@pytest.mark.xdist_group("detection")
def test_save_load_round_trip_fcos(tmp_path) -> None:
    """The file stores the submodule path and the backbone's input shapes; load replays the same backbone."""
    model, inputs, pruned = _pruned("fcos_resnet50_fpn")
    ctor = CASES["fcos_resnet50_fpn"][0]
    path = fxprune.save(pruned, tmp_path / "fcos.fxp")
    meta = fxprune.serialize.read_metadata(path)
    assert meta["submodule"] == "backbone" and meta["inputs"] == [{"shape": [1, 3, 128, 128], "dtype": "torch.float32"}]
    sub_inputs, _ = capture_inputs(model, "backbone", inputs)
    with torch.no_grad():
        want = pruned(*inputs)
        for again in (fxprune.load(path, ctor), fxprune.load(path, model, inputs)):
            assert type(again) is type(model) and isinstance(again.backbone, fx.GraphModule)
            assert again.fxprune_plan.to_json() == pruned.fxprune_plan.to_json()
            _close(again.backbone(*sub_inputs), pruned.backbone(*sub_inputs), "reloaded backbone", tol=1e-6)
            got = again(*inputs)
            assert got[0]["boxes"].shape == want[0]["boxes"].shape
            _close(got, want, "reloaded detections", tol=1e-5)
    assert isinstance(model.backbone, nn.Module) and not isinstance(model.backbone, fx.GraphModule)


# -- cheap cases: a custom model whose top level does not trace -------------------------------------------------


class Gated(nn.Module):
    """Data-dependent control flow at the top (torch.fx cannot trace it), a traceable body called by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ResCatNet(width=8, fuse=16, classes=4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x=x)
        return y if bool(y.sum() > 0) else -y


def test_untraceable_top_keyword_call_and_data() -> None:
    model = Gated().eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(fxprune.TraceFailure):
        fxprune.trace(model)
    recipe = {"submodule": "body", "stages": [{"target": {"sparsity": 0.5}, "criterion": "taylor"}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x, data=[torch.randn(2, 3, 12, 12) for _ in range(2)])
    assert isinstance(pruned, Gated) and isinstance(pruned.body, fx.GraphModule)
    assert pruned.body.get_submodule("stem.0").out_channels == 4 and pruned.body.fc.out_features == 4
    assert_masked_equals_shrunk(model.body, pruned.fxprune_plan, (x,), pruned.body)
    masked = _with_masked(model, "body", pruned.fxprune_plan, (x,))
    with torch.no_grad():
        _close(pruned(x), masked(x), "whole Gated")
    with pytest.raises(fxprune.FxPruneError, match="labels"):
        fxprune.compile(model, recipe, example_inputs=x, data=[(x, torch.tensor([0, 1]))])
    rep = fxprune.report(model, pruned, x)  # the whole model does not trace: MACs are the submodule's
    assert rep.submodule == "body" and rep.macs_ratio < 0.6 and rep.params_ratio < 1
    assert "of submodule 'body'" in str(rep)


def test_callbacks_see_the_whole_model() -> None:
    model = Gated().eval()
    x = torch.randn(2, 3, 12, 12)
    seen: list[type] = []

    def evaluate(m: nn.Module) -> float:
        seen.append(type(m))
        with torch.no_grad():
            m(x)
        return 1.0

    recipe = {"submodule": "body", "stages": [{"kind": "iterative", "target": {"flops": 0.3}, "steps": 2}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x, evaluate=evaluate)
    assert seen and set(seen) == {Gated}
    assert_masked_equals_shrunk(model.body, pruned.fxprune_plan, (x,), pruned.body)


def test_scope_errors_name_the_path() -> None:
    model = Gated().eval()
    x = torch.randn(1, 3, 12, 12)
    stages = [{"target": {"sparsity": 0.5}}]
    with pytest.raises(fxprune.FxPruneError, match=r"'bdy'.*did you mean 'body'"):
        fxprune.compile(model, {"submodule": "bdy", "stages": stages}, example_inputs=x)
    with pytest.raises(fxprune.FxPruneError, match=r"'body\.stem\.7'.*'body\.stem' \(Sequential\) has no "
                                                   r"submodule '7'"):
        fxprune.compile(model, {"submodule": "body.stem.7", "stages": stages}, example_inputs=x)
    with pytest.raises(fxprune.FxPruneError, match=r"'unused' \(Linear\) was never called"):
        fxprune.compile(model, {"submodule": "unused", "stages": stages}, example_inputs=x)
    with pytest.raises(fxprune.ExampleInputsError, match="capture the inputs of submodule 'body'"):
        fxprune.compile(model, {"submodule": "body", "stages": stages}, example_inputs=torch.randn(1, 5, 12, 12))
    assert not model.body._forward_pre_hooks and not model.unused._forward_pre_hooks


def test_scope_taking_a_dict_is_refused_naming_the_parent() -> None:
    """An FPN takes an OrderedDict of feature maps: the error says to prune its parent (the backbone) instead."""
    model = CASES["fasterrcnn_mobilenet_v3_large_fpn"][0]().eval()
    recipe = {"submodule": "backbone.fpn", "stages": [{"target": {"sparsity": 0.5}}]}
    with pytest.raises(fxprune.FxPruneError, match=r"'backbone\.fpn' \(FeaturePyramidNetwork\) gets tensors packed in "
                                                   r"a OrderedDict as input 0.*parent 'backbone'"):
        fxprune.compile(model, recipe, example_inputs=_inputs(64, True))


@pytest.mark.parametrize("value, message", [(3, "dotted module path"), ("body..stem", "not a dotted module path"),
                                            ("body/stem", "not a dotted module path")])
def test_recipe_submodule_validated(value: Any, message: str) -> None:
    with pytest.raises(fxprune.RecipeError, match=rf"recipe field 'submodule': .*{message}"):
        fxprune.Recipe.load({"submodule": value, "stages": [{}]})


def test_recipe_root_scope_points_to_submodule() -> None:
    with pytest.raises(fxprune.RecipeError, match=r"recipe field 'scope'.*'submodule'"):
        fxprune.Recipe.load({"scope": "backbone", "stages": [{}]})


def test_recipe_submodule_round_trips(tmp_path) -> None:
    recipe = fxprune.Recipe.load({"submodule": "backbone.body",
                                  "stages": [{"target": {"flops": 0.3}, "scope": "global"}]})
    assert recipe.to_dict()["submodule"] == "backbone.body"
    again = fxprune.Recipe.load(recipe.to_dict())
    assert again == recipe and again.to_json() == recipe.to_json()
    (tmp_path / "r.json").write_text(recipe.to_json())
    assert fxprune.Recipe.load(tmp_path / "r.json") == recipe
    plain = fxprune.Recipe.load({"stages": [{}]})
    assert plain.submodule == "" and "submodule" not in plain.to_dict()


def test_backend_compiles_the_submodule_and_saves(tmp_path) -> None:
    """With ``backend``, only the pruned submodule is torch.compile'd; save strips the wrapper from the keys."""
    model = Gated().eval()
    x = torch.randn(2, 3, 12, 12)
    recipe = {"submodule": "body", "stages": [{"target": {"flops": 0.4}}]}
    plain = fxprune.compile(model, recipe, example_inputs=x)
    compiled = fxprune.compile(model, recipe, example_inputs=x, backend="aot_eager")
    assert isinstance(compiled, Gated) and isinstance(compiled.body, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.fxprune_plan.to_json() == plain.fxprune_plan.to_json()
    with torch.no_grad():
        _close(compiled(x), plain(x), "compiled body", tol=1e-5)
    again = fxprune.load(fxprune.save(compiled, tmp_path / "gated.fxp"), Gated)
    assert isinstance(again.body, fx.GraphModule)
    with torch.no_grad():
        _close(again(x), plain(x), "reloaded compiled body", tol=1e-5)


def test_train_mode_kept_and_user_model_untouched() -> None:
    """A model in train mode: inputs are captured in eval mode, the result comes back in train mode, and the
    user's model keeps its modes, weights, submodules and hooks."""
    model = Gated().train()
    x = torch.randn(2, 3, 12, 12)
    state = state_digest(model)
    body = model.body
    pruned = fxprune.compile(model, {"submodule": "body", "stages": [{"target": {"sparsity": 0.5}}]}, example_inputs=x)
    assert pruned.training and pruned.body.training and all(m.training for m in model.modules())
    assert model.body is body and not body._forward_pre_hooks and not hasattr(model, "fxprune_plan")
    assert state_digest(model) == state
    assert pruned.body.get_submodule("stem.0").out_channels < body.stem[0].out_channels
    assert_masked_equals_shrunk(model.body, pruned.fxprune_plan, (x,), pruned.body)


def test_nested_path_keeps_its_boundary() -> None:
    """``body.body`` (conv-bn-relu-conv-bn inside ResCatNet): only its hidden channels shrink, the ends stay."""
    model = Gated().eval()
    x = torch.randn(2, 3, 12, 12)
    pruned = fxprune.compile(model, {"submodule": "body.body", "stages": [{"target": {"sparsity": 0.5}}]},
                             example_inputs=x)
    inner = pruned.body.body
    assert isinstance(pruned.body, ResCatNet) and isinstance(inner, fx.GraphModule)
    convs = [m for m in inner.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 8)]  # 16 hidden -> 8, ends kept
    sub_inputs, _ = capture_inputs(model, "body.body", (x,))
    assert_masked_equals_shrunk(model.body.body, pruned.fxprune_plan, sub_inputs, inner)
    masked = _with_masked(model, "body.body", pruned.fxprune_plan, sub_inputs)
    with torch.no_grad():
        _close(pruned(x), masked(x), "whole Gated with body.body pruned")
