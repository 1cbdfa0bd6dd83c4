"""The patches stage's ``proposal_weights``: a torchvision weights name or a state-dict file loaded into the proposal.

The weights must reach the ``papr`` submodule exactly (every parameter and BatchNorm statistic), select the same
tokens as the same network registered by hand, travel in ``fxprune.save`` (so ``load`` needs neither the file nor
the network), and bad values name the recipe field.
"""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from papr_reference import reference_token_indices
from safetensors.torch import save_file
from torch import nn

import fxprune
from fxprune import RecipeError
from fxprune.stages.patches import PatchStage, register_proposal
from fxprune.stages.patches.gather import SUBMODULE
from fxprune.testing import state_digest

MOBILENET = "torchvision:mobilenet_v3_small"


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes the head
    return model


def _trained_mobilenet(seed: int = 7) -> nn.Module:
    """A MobileNetV3-small whose weights and BatchNorm statistics differ from a fresh ``weights=None`` build."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def _recipe(**fields) -> dict:
    return {"stages": [{"kind": "patches", "keep": 0.5, "proposal": MOBILENET, **fields}]}


def _assert_same_state(got: nn.Module, want: nn.Module) -> None:
    assert state_digest(got) == state_digest(want), "the proposal's weights are not the given ones"


@pytest.mark.parametrize("form", ["whole classifier, .pt", "features only, .safetensors"])
def test_state_dict_file_reaches_the_proposal_and_selects_its_tokens(tmp_path, form: str) -> None:
    trained = _trained_mobilenet()
    if form.startswith("whole"):
        path = tmp_path / "mobilenet.pt"
        torch.save(trained.state_dict(), path)
    else:
        path = tmp_path / "mobilenet_features.safetensors"
        save_file({k: v.contiguous() for k, v in trained.features.state_dict().items()}, str(path))
    model, x = _vit(), torch.randn(3, 3, 64, 64)
    pruned = fxprune.compile(model, _recipe(proposal_weights=str(path)), example_inputs=x[:1])
    proposal = pruned.get_submodule(SUBMODULE).proposal
    _assert_same_state(proposal, trained.features)
    assert not proposal.training

    register_proposal("tests:trained_mobilenet", trained.features)
    by_hand = fxprune.compile(model, _recipe(proposal="tests:trained_mobilenet"), example_inputs=x[:1])
    with torch.no_grad():
        assert torch.equal(pruned(x), by_hand(x))
    want = reference_token_indices(trained.features, x, (8, 8), 0.5)
    random_init = reference_token_indices(torchvision.models.mobilenet_v3_small(weights=None).features, x, (8, 8), 0.5)
    assert not torch.equal(want, random_init), "the trained proposal should pick other tokens than a random one"
    kept = {}
    handle = pruned.get_submodule(SUBMODULE).register_forward_hook(lambda m, i, o: kept.update(sig=o))
    with torch.no_grad():
        pruned(x)
    handle.remove()
    got = fxprune.stages.patches.select.select_tokens(kept["sig"], 8, 8, want.shape[1], 1)
    assert torch.equal(got, want.sort(dim=1).values)


def test_registered_proposal_takes_a_checkpoint_file(tmp_path, tiny_proposal: nn.Module) -> None:
    torch.manual_seed(5)
    other = type(tiny_proposal)().eval()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": other.state_dict(), "epoch": 3}, path)  # a training checkpoint
    x = torch.randn(2, 3, 32, 32)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=4).eval()
    pruned = fxprune.compile(vit, _recipe(proposal="tests:tiny", proposal_weights=str(path)), example_inputs=x)
    _assert_same_state(pruned.get_submodule(SUBMODULE).proposal, other)
    # the registered one untouched
    _assert_same_state(tiny_proposal, fxprune.stages.patches.build_proposal("tests:tiny"))


def test_save_and_load_need_neither_the_file_nor_the_network(tmp_path) -> None:
    trained = _trained_mobilenet(11)
    weights = tmp_path / "mobilenet.pt"
    torch.save(trained.state_dict(), weights)
    model, x = _vit(), torch.randn(2, 3, 64, 64)
    pruned = fxprune.compile(model, _recipe(proposal_weights=str(weights)), example_inputs=x[:1])
    saved = fxprune.save(pruned, tmp_path / "vit.fxp", example_inputs=x[:1])
    weights.unlink()
    again = fxprune.load(saved, _vit)
    _assert_same_state(again.get_submodule(SUBMODULE).proposal, trained.features)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_torchvision_weights_name_loads_through_the_hub_cache(tmp_path) -> None:
    """``"DEFAULT"`` goes through torchvision's own weights loader; the checkpoint is put in a fresh hub cache first,
    so nothing is downloaded (the network is not reachable here)."""
    trained = _trained_mobilenet(3)
    url = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(trained.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        pruned = fxprune.compile(_vit(), _recipe(proposal_weights="DEFAULT"), example_inputs=torch.randn(1, 3, 64, 64))
    finally:
        torch.hub.set_dir(previous)
    _assert_same_state(pruned.get_submodule(SUBMODULE).proposal, trained.features)


def test_bad_weights_name_the_field(tmp_path, tiny_proposal: nn.Module) -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.proposal_weights.*'/no/such/file.pt' does not exist"):
        fxprune.Recipe.load(_recipe(proposal_weights="/no/such/file.pt"))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.proposal_weights.*no weights 'IMAGENET21K'.*"
                                          r"IMAGENET1K_V1, DEFAULT"):
        fxprune.Recipe.load(_recipe(proposal_weights="IMAGENET21K"))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.proposal_weights.*registered proposal such as 'tests:tiny' "
                                          r"takes weights only from a file"):
        fxprune.Recipe.load(_recipe(proposal="tests:tiny", proposal_weights="DEFAULT"))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.proposal_weights.*must be a torchvision weights name"):
        fxprune.Recipe.load(_recipe(proposal_weights=3))

    model, x = _vit(), torch.randn(1, 3, 64, 64)
    before = state_digest(model)
    wrong = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"proposal_weights: state dict .*resnet.pt' does not fit proposal "
                                         r"'torchvision:mobilenet_v3_small'.*missing .*unexpected"):
        fxprune.compile(model, _recipe(proposal_weights=str(wrong)), example_inputs=x)
    not_a_state = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state)
    with pytest.raises(ValueError, match=r"proposal_weights: .*list.pt' holds no state dict"):
        fxprune.compile(model, _recipe(proposal_weights=str(not_a_state)), example_inputs=x)
    assert state_digest(model) == before


def test_stage_with_weights_round_trips_through_json(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _trained_mobilenet().features.state_dict().items()}, str(path))
    recipe = fxprune.Recipe.load(_recipe(proposal_weights=str(path)))
    again = fxprune.Recipe.load(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe
    assert isinstance(again.stages[0], PatchStage) and again.stages[0].proposal_weights == str(path)


def test_proposal_follows_the_model_precision(tiny_proposal: nn.Module) -> None:
    """A half-precision ViT gets a half-precision proposal (built in float32, then moved like the input image)."""
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=4).eval().half()
    x = torch.randn(2, 3, 32, 32).half()
    pruned = fxprune.compile(vit, _recipe(proposal="tests:tiny"), example_inputs=x[:1])
    papr = pruned.get_submodule(SUBMODULE)
    assert all(p.dtype == torch.float16 for p in papr.proposal.parameters())
    seen = {}
    handle = papr.register_forward_hook(lambda m, i, o: seen.update(sig=o))
    with torch.no_grad():
        out = pruned(x)
        want = papr.proposal(x).float().mean(1, keepdim=True)  # PaPr's map: the channel mean of the proposal
    handle.remove()
    assert out.dtype == torch.float16 and out.shape == (2, 4) and torch.isfinite(out).all()
    assert torch.equal(seen["sig"], want)
