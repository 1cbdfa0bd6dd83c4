"""PaPr on ViTs: torchvision VisionTransformer (vit_b_16 architecture at reduced size) and timm DeiT.

Every rewritten model is compared with a hand-written reference: indices computed independently (argsort of the
proposal's resized channel mean), tokens gathered by them, and the remaining blocks run by hand.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from papr_reference import reference_token_indices, take
from torch import nn

import fxprune
from fxprune.stages.patches.gather import SUBMODULE
from fxprune.testing import assert_compiles

GRID = (4, 4)  # 32x32 images, 8x8 patches


def _torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return m.eval()


def _deit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10).eval()


def _torchvision_reference(m: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    t = m._process_input(x)
    t = torch.cat([m.class_token.expand(len(x), -1, -1), t], dim=1) + m.encoder.pos_embedding
    t = take(t, idx)
    t = m.encoder.ln(m.encoder.layers(m.encoder.dropout(t)))
    return m.heads(t[:, 0])


def _deit_reference(m: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    t = m.patch_embed(x)
    t = torch.cat([m.cls_token.expand(len(x), -1, -1), t], dim=1) + m.pos_embed
    t = take(t, idx)
    t = m.norm(m.blocks(m.norm_pre(t)))
    return m.head(t[:, 0])


MODELS = {"torchvision_vit": (_torchvision_vit, _torchvision_reference),
          "timm_deit": (_deit, _deit_reference)}


def _recipe(z: float, proposal: str = "tests:tiny") -> dict:
    return {"stages": [{"kind": "patches", "keep": z, "proposal": proposal}]}


def _images(n: int = 4) -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("z", [0.7, 0.5, 0.3])
def test_equals_hand_written_reference(name: str, z: float, tiny_proposal: nn.Module) -> None:
    build, reference = MODELS[name]
    model, x = build(), _images()
    pruned = fxprune.compile(model, _recipe(z), example_inputs=x[:1])
    idx = reference_token_indices(tiny_proposal, x, GRID, z)
    assert idx.shape[1] == int(17 * z)
    entry = pruned.fxprune_plan.rewrites[0]
    assert entry["pass"] == "patches" and entry["mode"] == "tokens" and entry["tokens"] == idx.shape[1]
    assert entry["grid"] == list(GRID) and entry["prefix"] == 1
    with torch.no_grad():
        want = reference(model, x, idx)
        got = pruned(x)
        full = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # dropping tokens really changed the logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_one_reproduces_the_original(name: str, tiny_proposal: nn.Module) -> None:
    model, x = MODELS[name][0](), _images()
    pruned = fxprune.compile(model, _recipe(1.0), example_inputs=x[:2])
    assert pruned.fxprune_plan.rewrites[0]["tokens"] == 17
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_class_token_kept_and_images_select_different_tokens(name: str, tiny_proposal: nn.Module) -> None:
    model, x = MODELS[name][0](), _images(4)
    pruned = fxprune.compile(model, _recipe(0.5), example_inputs=x[:1])
    seen = {}
    pruned.get_submodule(SUBMODULE).register_forward_hook(lambda m, a, out: seen.setdefault("sig", out))
    gather = next(n for n in pruned.graph.nodes if n.op == "call_function" and n.target.__name__ == "select_tokens")
    from torch.fx import Interpreter

    class Capture(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is gather:
                seen["idx"] = out
            return out

    with torch.no_grad():
        Capture(pruned).run(x)
    idx = seen["idx"]
    assert idx.shape == (4, 8)
    assert torch.all(idx[:, 0] == 0)  # the class token, always first
    assert torch.all(idx[:, 1:] >= 1)
    want = reference_token_indices(model_proposal := pruned.get_submodule(SUBMODULE).proposal, x, GRID, 0.5)
    assert model_proposal is not tiny_proposal  # the registered module was copied, never used in place
    assert [set(r.tolist()) for r in idx] == [set(r.tolist()) for r in want]
    assert len({tuple(r.tolist()) for r in idx}) > 1  # different images keep different patches


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fullgraph_compile_without_graph_breaks(name: str, tiny_proposal: nn.Module) -> None:
    torch._dynamo.reset()
    model, x = MODELS[name][0](), _images(2)
    pruned = fxprune.compile(model, _recipe(0.5), example_inputs=x)
    assert_compiles(pruned, x)


def test_default_mobilenet_proposal_and_batch_sizes() -> None:
    """The default proposal (mobilenet_v3_small features) on 64x64 images: a 2x2 map resized to the 8x8 grid."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)
    pruned = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 0.5}]},
                             example_inputs=torch.randn(1, 3, 64, 64))
    proposal = pruned.get_submodule(SUBMODULE).proposal
    assert isinstance(proposal, nn.Sequential) and type(proposal[0]).__name__ == "Conv2dNormActivation"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        idx = reference_token_indices(proposal, x, (8, 8), 0.5)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), _torchvision_reference(model, x, idx), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path, tiny_proposal: nn.Module) -> None:
    model, x = _deit(), _images(3)
    pruned = fxprune.compile(model, _recipe(0.5), example_inputs=x[:1])
    with torch.no_grad():  # stands in for fine-tuning, proposal included: the saved weights are what load returns
        for p in pruned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = fxprune.save(pruned, tmp_path / "deit.fxp", example_inputs=x[:1])
    again = fxprune.load(path, _deit)
    assert again.fxprune_plan.rewrites == pruned.fxprune_plan.rewrites
    for key, value in pruned.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert any(k.startswith(f"{SUBMODULE}.proposal.") for k in again.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x), atol=0, rtol=0)


def test_hard_coded_sequence_length_is_rewritten(tiny_proposal: nn.Module) -> None:
    """A ViT whose forward bakes the token count into a reshape still runs on the shorter sequence."""

    class FixedLengthViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 8, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 16))
            self.pos = nn.Parameter(torch.randn(1, 17, 16))
            self.qkv = nn.Linear(16, 48)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x).flatten(2).transpose(1, 2)], 1) + self.pos
            q, k, v = self.qkv(t).reshape(-1, 17, 3, 16).unbind(2)  # 17: the sequence length, hard-coded
            t = t + torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v
            return self.head(t[:, 0])

    model, x = FixedLengthViT().eval(), _images(2)
    pruned = fxprune.compile(model, _recipe(0.5), example_inputs=x)
    idx = reference_token_indices(tiny_proposal, x, GRID, 0.5)
    with torch.no_grad():
        t = torch.cat([model.cls.expand(2, -1, -1), model.embed(x).flatten(2).transpose(1, 2)], 1) + model.pos
        t = take(t, idx)
        q, k, v = model.qkv(t).reshape(2, 8, 3, 16).unbind(2)
        want = model.head((t + torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v)[:, 0])
        torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=1e-5)


def test_channels_then_patches_composes_and_round_trips(tmp_path, tiny_proposal: nn.Module) -> None:
    """A channel stage followed by a patches stage equals patches applied to the channel-pruned model, the plan
    replays as "shrink, then gather", and the combined model survives save/load."""
    model, x = _deit(), _images(3)
    channels = {"kind": "channels", "target": {"sparsity": 0.5}}
    patches = {"kind": "patches", "keep": 0.5, "proposal": "tests:tiny"}
    both = fxprune.compile(model, {"stages": [channels, patches]}, example_inputs=x[:1])
    shrunk = fxprune.compile(model, {"stages": [channels]}, example_inputs=x[:1])
    then = fxprune.compile(shrunk, {"stages": [patches]}, example_inputs=x[:1])
    assert both.fxprune_plan.kept == shrunk.fxprune_plan.kept and len(both.fxprune_plan.rewrites) == 1
    path = fxprune.save(both, tmp_path / "both.fxp", example_inputs=x[:1])
    again = fxprune.load(path, _deit)
    with torch.no_grad():
        torch.testing.assert_close(both(x), then(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(again(x), both(x), atol=0, rtol=0)
        assert not torch.allclose(both(x), shrunk(x), atol=1e-3)


@pytest.mark.parametrize("name, options, prefix", [
    ("deit_tiny_distilled_patch16_224", {}, 2),                              # class + distillation token
    ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),                          # class + 4 register tokens
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),  # no class token
])
def test_timm_prefix_tokens_are_all_kept(name: str, options: dict, prefix: int, tiny_proposal: nn.Module) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=10,
                              **options).eval()
    x = _images(3)
    pruned = fxprune.compile(model, _recipe(0.5), example_inputs=x[:1])
    entry = pruned.fxprune_plan.rewrites[0]
    assert entry["prefix"] == prefix and entry["tokens"] == int((16 + prefix) * 0.5)
    idx = reference_token_indices(tiny_proposal, x, GRID, 0.5, prefix)
    with torch.no_grad():
        t = take(model._pos_embed(model.patch_embed(x)), idx)
        want = model.forward_head(model.norm(model.blocks(model.norm_pre(t))))
        torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=1e-5)


def test_train_mode_fine_tunes_the_vit_and_freezes_the_proposal(tiny_proposal: nn.Module) -> None:
    model, x = _deit().train(), _images(3)
    pruned = fxprune.compile(model, _recipe(0.5), example_inputs=x[:1])
    significance = pruned.get_submodule(SUBMODULE)
    assert pruned.training and significance.training and not significance.proposal.training
    pruned(x).square().mean().backward()
    assert all(p.grad is None for p in significance.proposal.parameters())  # no gradient into the proposal
    assert pruned.pos_embed.grad is not None and pruned.pos_embed.grad.abs().sum() > 0
    before = significance.proposal.body[1].running_mean.clone()
    pruned(x)
    assert torch.equal(significance.proposal.body[1].running_mean, before)  # BatchNorm statistics untouched


def test_hidden_width_equal_to_the_sequence_length_is_left_alone(tiny_proposal: nn.Module) -> None:
    """17 tokens of width 17: only the reshape size at the token dim becomes the kept count."""

    class SquareViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 17, 8, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 17))
            self.pos = nn.Parameter(torch.randn(1, 17, 17))
            self.head = nn.Linear(17, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x).flatten(2).transpose(1, 2)], 1) + self.pos
            t = t.reshape(-1, 17, 17) * 2  # (tokens, width): both 17
            return self.head(t[:, 0])

    model, x = SquareViT().eval(), _images(2)
    pruned = fxprune.compile(model, _recipe(0.5), example_inputs=x)
    reshape = next(n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "reshape")
    assert reshape.args[1:] == (-1, 8, 17)
    idx = reference_token_indices(tiny_proposal, x, GRID, 0.5)
    with torch.no_grad():
        t = torch.cat([model.cls.expand(2, -1, -1), model.embed(x).flatten(2).transpose(1, 2)], 1) + model.pos
        t = take(t, idx)
        torch.testing.assert_close(pruned(x), model.head((t * 2)[:, 0]), atol=1e-5, rtol=1e-5)
