"""PaPr on hierarchical models (torchvision Swin and ConvNeXt, timm Swin): no token is dropped; each stage's MLP runs
on the kept positions of its grid and writes zeros elsewhere.

Reference, written independently of the pass: the ORIGINAL model, with a forward hook zeroing each MLP's output at
the positions the paper's selection drops (an MLP is per position, so running it on the kept rows and scattering
them into zeros is the same as zeroing the dropped rows of its full output).
"""
from __future__ import annotations

import pytest
import timm
import torch
from papr_reference import reference_order
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import fxprune


def _swin() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    m = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                        num_classes=10).eval()
    return m, [m.features[1][0].mlp, m.features[3][0].mlp]


def _swin_v2() -> tuple[nn.Module, list[nn.Module]]:
    """Post-norm blocks: the MLP branch is norm2(mlp(x)), zero at dropped positions as a whole."""
    torch.manual_seed(0)
    m = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                        num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    return m, [m.features[1][0].norm2, m.features[3][0].norm2]


def _convnext() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    m = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).eval()
    for block in (m.features[1][0], m.features[3][0]):
        nn.init.normal_(block.layer_scale, std=0.5)  # torchvision starts layer scales at 1e-6
    return m, [m.features[1][0].block[5], m.features[3][0].block[5]]


def _timm_swin() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4, embed_dim=16,
                          depths=(1, 1), num_heads=(1, 2), num_classes=10).eval()
    return m, [m.layers[0].blocks[0].mlp, m.layers[1].blocks[0].mlp]


def _timm_convnext() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    m = timm.create_model("convnext_tiny", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                          num_classes=10).eval()
    for stage in m.stages:
        nn.init.normal_(stage.blocks[0].gamma, std=0.5)  # timm starts layer scales at 1e-6
    return m, [stage.blocks[0].mlp for stage in m.stages]


MODELS = {"torchvision_swin": _swin, "torchvision_swin_v2": _swin_v2, "torchvision_convnext": _convnext,
          "timm_swin": _timm_swin, "timm_convnext": _timm_convnext}
GRIDS = [(8, 8), (4, 4), (2, 2), (1, 1)]  # 32x32 images: stride 4, 8, 16, 32


def _reference(model: nn.Module, mlps: list[nn.Module], proposal: nn.Module, x: torch.Tensor, z: float) -> torch.Tensor:
    hooks = []
    for mlp, (h, w) in zip(mlps, GRIDS):
        k = max(1, int(h * w * z))
        mask = torch.zeros(len(x), h * w)
        mask.scatter_(1, reference_order(proposal, x, (h, w))[:, :k], 1.0)

        def zero_dropped(module, args, out, mask=mask):
            return out * mask.reshape(out.shape[0], *out.shape[1:-1], 1)  # (B, H, W, 1) or (B, H*W, 1)

        hooks.append(mlp.register_forward_hook(zero_dropped))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("z", [0.65, 0.3])
def test_mlp_on_kept_positions_equals_reference(name: str, z: float, tiny_proposal: nn.Module) -> None:
    model, mlps = MODELS[name]()
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    pruned = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": z, "proposal": "tests:tiny"}]},
                             example_inputs=x[:1])
    entry = pruned.fxprune_plan.rewrites[0]
    assert entry["mode"] == "mlp" and len(entry["regions"]) == len(mlps)
    want = _reference(model, mlps, tiny_proposal, x, z)
    with torch.no_grad():
        got, full = pruned(x), model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, full, atol=1e-4)  # the dropped positions really lost their MLP update


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_one_reproduces_the_original(name: str, tiny_proposal: nn.Module) -> None:
    model, _ = MODELS[name]()
    x = torch.randn(2, 3, 32, 32)
    pruned = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 1.0, "proposal": "tests:tiny"}]},
                             example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-6, rtol=1e-6)


def test_save_load_round_trip_and_compile(tmp_path, tiny_proposal: nn.Module) -> None:
    model, _ = _convnext()
    x = torch.randn(2, 3, 32, 32)
    pruned = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "tests:tiny"}]},
                             example_inputs=x)
    path = fxprune.save(pruned, tmp_path / "convnext.fxp", example_inputs=x)
    again = fxprune.load(path, _convnext()[0])
    assert again.fxprune_plan.rewrites == pruned.fxprune_plan.rewrites
    torch._dynamo.reset()
    explained = torch._dynamo.explain(again)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["torchvision_convnext", "timm_swin"])
def test_pruned_model_traces_again_and_counts_fewer_macs(name: str, tiny_proposal: nn.Module) -> None:
    """A PaPr model is itself traceable (benchmarks count its MACs; fxprune.compile accepts it as input)."""
    from fxprune.work import count_work

    model, _ = MODELS[name]()
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.compile(model, {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "tests:tiny"}]},
                             example_inputs=x)
    proposal = count_work(pruned.get_submodule("papr").proposal, x)["macs"]
    assert proposal > 0
    assert count_work(pruned, x)["macs"] - proposal < count_work(model, x)["macs"]
    retraced = fxprune.trace(pruned)
    with torch.no_grad():
        torch.testing.assert_close(retraced(x), pruned(x), atol=0, rtol=0)
