"""The first Python example of README.md runs as written (ResNet-50 at 224x224 takes a few seconds on one CPU core,
so it is not scaled down)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fxprune

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its plan file to the working directory
    code = _first_python_block()
    assert "fxprune.compile(" in code
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "MACs" in printed and "params" in printed  # the report table was printed
    model, pruned, x = namespace["model"], namespace["pruned"], namespace["x"]
    rep = fxprune.report(model, pruned, x)
    assert abs(rep.macs_ratio - 0.5) < 0.02  # the recipe's flops: 0.5
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    saved = list(tmp_path.glob("*.json"))
    assert len(saved) == 1 and fxprune.Plan.load(saved[0]).kept == pruned.fxprune_plan.kept


def test_readme_vit_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second example (every stage kind chained) runs as written, on a narrower ViT so CI stays fast: the
    builder is swapped for a 2-layer VisionTransformer with the same 224x224 input and patch grid."""
    import torchvision
    from torchvision.models.vision_transformer import VisionTransformer

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2 and '"kind": "patches"' in blocks[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torchvision.models, "vit_b_16", lambda weights=None: VisionTransformer(
        image_size=224, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256))
    namespace: dict = {"__name__": "readme_example", "torch": torch, "torchvision": torchvision, "fxprune": fxprune,
                       "x": torch.randn(1, 3, 224, 224)}
    exec(compile(blocks[1], str(README), "exec"), namespace)
    vit, small, x = namespace["vit"], namespace["small"], namespace["x"]
    kinds = [r["pass"] for r in small.fxprune_plan.rewrites]
    assert kinds == ["blocksparse", "patches"] and small.fxprune_plan.kept  # heads + channels shrank too
    from fxprune.nn import BlockSparseLinear
    from fxprune.work import count_work

    assert any(isinstance(m, BlockSparseLinear) for m in small.modules())
    # the stand-in ViT is smaller than the MobileNetV3 proposal, so compare the ViT's own work
    proposal = count_work(torchvision.models.mobilenet_v3_small(weights=None).features.eval(), x)["macs"]
    rep = fxprune.report(vit, small, x)
    assert rep.macs[1] - proposal < 0.5 * rep.macs[0]
    with torch.no_grad():
        torch.testing.assert_close(namespace["fast"](x), small(x), atol=1e-4, rtol=1e-4)
    again = fxprune.load("vit.fxp", vit, x)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))
