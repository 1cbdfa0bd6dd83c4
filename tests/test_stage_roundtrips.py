"""Every stage kind survives the two ways a pruned model leaves the process:

* ``fxprune.save(pruned, path)`` with no example inputs, then ``fxprune.load(path, arch)`` with none: the shapes the
  model was pruned with are recorded by ``save`` itself, and the rebuilt model computes what the pruned one does;
* ``torch.onnx.export(pruned, (x,), f, dynamo=True)``, run in onnxruntime, matches eager within 1e-4 relative
  (``blocksparse`` exports its kept blocks as a dense MatMul on the weight rebuilt from them).

Tiny ViTs (torchvision's, and timm's packed-qkv one for ``head_dim``) keep this fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fixtures import TinyProposal
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import fxprune

PROPOSAL = "roundtrip-test:tiny"
STAGES = {
    "channels": [{"kind": "channels", "target": {"flops": 0.3}}],
    "heads": [{"kind": "heads", "target": {"sparsity": 0.5}}],
    "head_dim": [{"kind": "head_dim", "target": {"sparsity": 0.5}}],
    "iterative": [{"kind": "iterative", "target": {"flops": 0.2}, "steps": 2, "layers_per_step": 2}],
    "blocksparse": [{"kind": "blocksparse", "target": {"sparsity": 0.5}, "block": [16, 16]}],
    "patches": [{"kind": "patches", "keep": 0.5, "proposal": PROPOSAL}],
}
STAGES["all"] = [STAGES["heads"][0], {"kind": "channels", "target": {"flops": 0.2}, "round_to": 16},
                 STAGES["blocksparse"][0], STAGES["patches"][0]]
ONNX_KINDS = ["channels", "heads", "head_dim", "blocksparse", "patches", "all"]
X = torch.randn(2, 3, 32, 32)


def _torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initializes the head
    return model.eval()


def _timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                            num_heads=4, num_classes=5).eval()


ARCH = {kind: _timm_vit if kind == "head_dim" else _torchvision_vit for kind in STAGES}


def _evaluate(model: nn.Module) -> float:
    with torch.no_grad():
        return -float(model(X).float().pow(2).mean())


@pytest.fixture(scope="module", autouse=True)
def _proposal() -> None:
    torch.manual_seed(1)
    fxprune.stages.patches.register_proposal(PROPOSAL, TinyProposal().eval())


def _prune(kind: str) -> tuple[nn.Module, nn.Module]:
    model = ARCH[kind]()
    extra = {"evaluate": _evaluate} if kind == "iterative" else {}
    pruned = fxprune.compile(model, {"stages": STAGES[kind]}, example_inputs=X, **extra)
    assert fxprune.report(model, pruned, X).macs_ratio < 0.97, f"{kind} removed no work"
    return model, pruned


@pytest.mark.parametrize("kind", list(STAGES))
def test_bare_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    _, pruned = _prune(kind)
    path = fxprune.save(pruned, tmp_path / f"{kind}.fxp")  # no example_inputs: save records the traced shapes
    assert fxprune.serialize.read_metadata(path)["inputs"] == [{"shape": [2, 3, 32, 32], "dtype": "torch.float32"}]
    again = fxprune.load(path, ARCH[kind])  # no example_inputs either
    assert again.state_dict().keys() == pruned.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(again(X), pruned(X), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ONNX_KINDS)
def test_onnx_export_matches_eager(kind: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    _, pruned = _prune(kind)
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(pruned, (X,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        want = pruned(X).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
