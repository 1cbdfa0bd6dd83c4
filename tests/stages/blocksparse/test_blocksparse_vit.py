"""End to end on a timm DeiT: blocksparse at 50% of the linear layers' MACs equals the block-masked dense model,
compiles with ``fullgraph=True`` and no graph breaks, survives save/load, and follows a ``channels`` stage."""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxprune
from fxprune.nn import BlockSparseLinear
from fxprune.passes.shrink_channels import ShrinkChannels
from fxprune.plan import Plan
from fxprune.testing import assert_masked_equals_shrunk, state_digest
from fxprune.work import count_work

LINEARS = [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def _calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]


def _copy(pruned: nn.Module) -> nn.Module:
    """A deep copy that keeps the plan (``GraphModule`` deep copies drop extra attributes)."""
    out = copy.deepcopy(pruned)
    out.fxprune_plan, out.fxprune_recipe = pruned.fxprune_plan, pruned.fxprune_recipe
    return out


def _linear_macs(model: nn.Module, paths: list[str], tokens: int) -> int:
    total = 0
    for p in paths:
        m = model.get_submodule(p)
        total += tokens * (m.values.numel() if isinstance(m, BlockSparseLinear) else m.weight.numel())
    return total


@pytest.fixture(scope="module")
def lpvit_pruned(deit: nn.Module, images: torch.Tensor) -> nn.Module:
    recipe = {"stages": [{"kind": "blocksparse", "target": {"sparsity": 0.5}, "block": [32, 32], "criterion": "lpvit"}]}
    return fxprune.compile(deit, recipe, example_inputs=images, data=_calibration())


def test_lpvit_half_linear_macs_equals_block_masked_dense(deit, images, lpvit_pruned, zero_blocks) -> None:
    before = state_digest(deit)
    pruned = lpvit_pruned
    (entry,) = pruned.fxprune_plan.rewrites
    assert entry["pass"] == "blocksparse" and set(entry["layers"]) <= set(LINEARS)
    assert "head" not in entry["layers"] and type(pruned.get_submodule("head")) is nn.Linear  # classifier stays
    # every chosen layer is now block-sparse and stores exactly the kept blocks of the original weight
    for path, spec in entry["layers"].items():
        m = pruned.get_submodule(path)
        assert isinstance(m, BlockSparseLinear) and m.block_shape == (32, 32)
        assert m.nnz_blocks == sum(len(c) for c in spec["kept"]) and m.values.shape == (m.nnz_blocks, 32, 32)
        w = deit.get_submodule(path).weight
        r0, c0 = 0, spec["kept"][0][0] if spec["kept"][0] else None
        if c0 is not None:
            assert torch.equal(m.values[0], w[r0:32, c0 * 32:(c0 + 1) * 32])
    # 50% of the linear layers' MACs are gone (tokens are the same in every chosen layer)
    tokens = 2 * 5
    removed = 1 - _linear_macs(pruned, LINEARS, tokens) / _linear_macs(deit, LINEARS, tokens)
    assert abs(removed - 0.5) <= 0.01
    assert pruned.fxprune_plan.stats["blocksparse_layer_macs_removed"] == pytest.approx(removed)
    assert count_work(pruned, images)["macs"] < count_work(deit, images)["macs"]
    # the oracle: the original model with the same blocks zeroed in its dense weights
    oracle = zero_blocks(deit, entry)
    with torch.no_grad():
        want, got = oracle(images), pruned(images)
        assert not torch.allclose(want, deit(images), atol=1e-3), "pruning must change the output"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state_digest(deit) == before  # the user's model is untouched


def test_flops_target_counts_model_macs_like_channels(deit, images, zero_blocks) -> None:
    recipe = {"stages": [{"kind": "blocksparse", "target": {"flops": 0.4}, "block": [16, 32], "criterion": "dimap"}]}
    pruned = fxprune.compile(deit, recipe, example_inputs=images)
    ratio = count_work(pruned, images)["macs"] / count_work(deit, images)["macs"]
    assert abs(ratio - 0.6) <= 0.01
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), zero_blocks(deit, pruned.fxprune_plan.rewrites[0])(images),
                                   atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_no_graph_breaks(lpvit_pruned, images) -> None:
    torch._dynamo.reset()
    pruned = _copy(lpvit_pruned)
    for grad in (True, False):  # the custom op (gradients to the blocks) and the CPU dense-cache path
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(pruned)(images)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    compiled = torch.compile(pruned, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), pruned(images), atol=1e-5, rtol=1e-5)


def test_finetuning_reaches_blocks_and_inference_follows(lpvit_pruned, images) -> None:
    pruned = _copy(lpvit_pruned).train()
    layer = pruned.get_submodule(next(iter(pruned.fxprune_plan.rewrites[0]["layers"])))
    start = layer.values.detach().clone()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    pruned(images).square().mean().backward()
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(layer.values, start)
    pruned.eval()
    with torch.no_grad():  # the dense cache was rebuilt by eval(): inference equals the op on the new blocks
        got = pruned(images)
        pruned.train()
        want = pruned(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(deit, lpvit_pruned, images, tmp_path: Path) -> None:
    pruned = _copy(lpvit_pruned)
    with torch.no_grad():  # stands in for fine-tuning: the saved blocks differ from the original weights
        for p in pruned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pruned.eval()
    path = fxprune.save(pruned, tmp_path / "deit.fxp", example_inputs=images)
    loaded = fxprune.load(path, deit, images)
    assert loaded.fxprune_plan.to_dict() == pruned.fxprune_plan.to_dict()
    for name in pruned.fxprune_plan.rewrites[0]["layers"]:
        assert isinstance(loaded.get_submodule(name), BlockSparseLinear)
    with torch.no_grad():
        assert torch.equal(loaded(images), pruned(images))
        assert not torch.allclose(loaded(images), lpvit_pruned(images))


def test_channels_then_blocksparse(deit, images, zero_blocks) -> None:
    recipe = {"stages": [
        {"kind": "channels", "target": {"flops": 0.2}, "round_to": 32},
        {"kind": "blocksparse", "target": {"sparsity": 0.5}, "block": [32, 32], "criterion": "l2"},
    ]}
    pruned = fxprune.compile(deit, recipe, example_inputs=images)
    plan = pruned.fxprune_plan
    assert plan.kept and len(plan.rewrites) == 1
    # the channel part alone: masked == shrunk (the existing oracle)
    dense = fxprune.trace(copy.deepcopy(deit).eval())
    fxprune.record_shapes(dense, (images,))
    ShrinkChannels(Plan(plan.kept, plan.sizes), (images,))(dense)
    assert_masked_equals_shrunk(deit, Plan(plan.kept, plan.sizes), (images,), dense)
    fc1 = dense.get_submodule("blocks.0.mlp.fc1")
    assert fc1.out_features < 768 and fc1.out_features % 32 == 0
    # the block part on top: the channel-shrunk dense model with the same blocks zeroed
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), zero_blocks(dense, plan.rewrites[0])(images), atol=1e-5, rtol=1e-5)
    assert isinstance(pruned.get_submodule("blocks.0.mlp.fc1"), BlockSparseLinear)


def test_hardware_aware_latency_term(deit, images, zero_blocks, tmp_path, monkeypatch) -> None:
    from fxprune.stages.blocksparse import latency

    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(latency, "_MEMORY", {})  # measure afresh into this test's table
    recipe = {"stages": [{"kind": "blocksparse", "target": {"sparsity": 0.5}, "criterion": "l2", "latency": 1.0}]}
    pruned = fxprune.compile(deit, recipe, example_inputs=images)
    stats = pruned.fxprune_plan.stats
    assert stats["blocksparse_dense_linear_ms"] > 0 and abs(stats["blocksparse_layer_macs_removed"] - 0.5) <= 0.01
    assert (tmp_path / "latency.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), zero_blocks(deit, pruned.fxprune_plan.rewrites[0])(images),
                                   atol=1e-5, rtol=1e-5)


class _OpLog(TorchDispatchMode):
    """Records the aten ops a forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_cpu_inference_runs_exactly_the_dense_ops(deit, lpvit_pruned, images) -> None:
    """No CPU slowdown by construction: in eval mode without gradients the block-sparse model runs the very aten
    ops of the dense traced model (one dense GEMM per linear layer, no scatter, no per-call densification)."""
    dense = fxprune.trace(copy.deepcopy(deit).eval())
    logs = []
    for model in (dense, lpvit_pruned):
        with torch.inference_mode(), _OpLog() as log:
            model(images)
        logs.append(log.ops)
    assert logs[0] == logs[1]
    assert "fxprune.blocksparse_linear" not in logs[1]


def test_torchvision_vit_mlp_blocks(zero_blocks) -> None:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    recipe = {"stages": [{"kind": "blocksparse", "target": {"sparsity": 0.5}, "block": [16, 16]}]}
    pruned = fxprune.compile(model, recipe, example_inputs=x)
    entry = pruned.fxprune_plan.rewrites[0]
    assert set(entry["layers"]) == {f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(2) for j in (0, 3)}
    assert pruned.fxprune_plan.stats["blocksparse_block_sparsity"] == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zero_blocks(model, entry)(x), atol=1e-5, rtol=1e-5)
