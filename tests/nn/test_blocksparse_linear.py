"""BlockSparseLinear: equality with the masked dense layer, torch.compile with no
graph breaks, state-dict round trip and gradients of the stored blocks."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.nn import BlockSparseLinear
from fxprune.testing import assert_compiles


def expand_mask(block_mask, block_shape):
    return block_mask.repeat_interleave(block_shape[0], 0).repeat_interleave(block_shape[1], 1)


def make_layer(n=96, k=128, block_shape=(32, 32), bias=True, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    mask = torch.rand(n // block_shape[0], k // block_shape[1], generator=gen) < density
    mask[-1] = False  # one empty block-row
    mask[0, 0] = True
    return linear, mask


@pytest.mark.parametrize("block_shape", [(16, 16), (32, 32), (32, 64), (48, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_equals_masked_linear(block_shape, bias):
    linear, mask = make_layer(block_shape=block_shape, bias=bias)
    layer = BlockSparseLinear.from_dense(linear, mask)
    dense_w = linear.weight * expand_mask(mask, block_shape)
    x = torch.randn(2, 7, 128)
    torch.testing.assert_close(layer(x), F.linear(x, dense_w, linear.bias), atol=1e-5, rtol=1e-5)
    # Only the kept blocks are stored; no dense weight anywhere in the module.
    assert layer.values.shape == (int(mask.sum()), *block_shape)
    assert set(layer.state_dict()) == {"values", "col_indices", "row_ptr"} | ({"bias"} if bias else set())
    assert isinstance(layer.values, nn.Parameter) and layer.block_shape == block_shape
    assert (layer.in_features, layer.out_features) == (128, 96)
    torch.testing.assert_close(layer.to_dense(), dense_w.detach(), atol=0, rtol=0)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), atol=1e-5, rtol=1e-5)


def test_extra_repr_and_density():
    linear, mask = make_layer()
    layer = BlockSparseLinear.from_dense(linear, mask)
    text = repr(layer)
    assert "block_shape=(32, 32)" in text and f"nnz_blocks={int(mask.sum())}" in text
    assert layer.density == pytest.approx(mask.float().mean().item())


@pytest.mark.parametrize("bad_mask, error", [
    (torch.ones(3, 3, dtype=torch.bool), ValueError),  # 128 % 3 != 0
    (torch.ones(3, 4), ValueError),  # not bool
    (torch.ones(12, dtype=torch.bool), ValueError),  # not 2-D
])
def test_from_dense_rejects_bad_masks(bad_mask, error):
    with pytest.raises(error):
        BlockSparseLinear.from_dense(nn.Linear(128, 96), bad_mask)


def test_state_dict_round_trip():
    linear, mask = make_layer(bias=True)
    layer = BlockSparseLinear.from_dense(linear, mask)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    # A fresh module built with another nnz adopts the stored block count.
    fresh = BlockSparseLinear(128, 96, (32, 32), nnz_blocks=1, bias=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(5, 128)
    assert fresh.nnz_blocks == layer.nnz_blocks and isinstance(fresh.values, nn.Parameter)
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)
    assert torch.equal(fresh.row_ptr, layer.row_ptr) and torch.equal(fresh.col_indices, layer.col_indices)


def test_torch_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    lin1, mask1 = make_layer(n=128, k=64, block_shape=(32, 16), seed=1)
    lin2, mask2 = make_layer(n=64, k=128, block_shape=(16, 32), seed=2)
    mlp = nn.Sequential(BlockSparseLinear.from_dense(lin1, mask1), nn.GELU(),
                        BlockSparseLinear.from_dense(lin2, mask2)).eval()
    x = torch.randn(2, 9, 64)
    assert_compiles(mlp, x, backend="inductor")
    with torch.no_grad():
        expected = mlp(x)
    ref = F.linear(F.gelu(F.linear(x, lin1.weight * expand_mask(mask1, (32, 16)), lin1.bias)),
                   lin2.weight * expand_mask(mask2, (16, 32)), lin2.bias)
    torch.testing.assert_close(expected, ref, atol=1e-4, rtol=1e-4)


def test_gradients_match_masked_dense():
    linear, mask = make_layer(block_shape=(16, 32))
    layer = BlockSparseLinear.from_dense(linear, mask)
    x = torch.randn(3, 4, 128, requires_grad=True)
    layer(x).square().sum().backward()
    x_grad = x.grad.clone()
    x.grad = None
    weight = (linear.weight * expand_mask(mask, (16, 32))).detach().requires_grad_(True)
    bias = linear.bias.detach().clone().requires_grad_(True)
    F.linear(x, weight, bias).square().sum().backward()
    torch.testing.assert_close(x_grad, x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad, bias.grad, atol=1e-4, rtol=1e-4)
    # d/dvalues is the dense weight gradient restricted to the stored blocks.
    dense_grad = BlockSparseLinear(128, 96, (16, 32), layer.nnz_blocks)
    with torch.no_grad():
        dense_grad.values.copy_(layer.values.grad)
        dense_grad.col_indices.copy_(layer.col_indices)
        dense_grad.row_ptr.copy_(layer.row_ptr)
    torch.testing.assert_close(dense_grad.to_dense(), weight.grad * expand_mask(mask, (16, 32)),
                               atol=1e-3, rtol=1e-4)


def test_fine_tuning_keeps_block_sparsity_and_compiles():
    torch._dynamo.reset()
    linear, mask = make_layer(block_shape=(32, 32))
    layer = BlockSparseLinear.from_dense(linear, mask)
    eager = BlockSparseLinear.from_dense(linear, mask)
    x, target = torch.randn(16, 128), torch.randn(16, 96)
    # aot_eager traces the registered backward formula without a C++ build.
    step_fn = torch.compile(lambda m: F.mse_loss(m(x), target), backend="aot_eager", fullgraph=True)
    for module, loss_fn in ((layer, step_fn), (eager, lambda m: F.mse_loss(m(x), target))):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(module).backward()
            opt.step()
    torch.testing.assert_close(layer.values, eager.values, atol=1e-5, rtol=1e-5)
    before = linear.weight.detach() * expand_mask(mask, (32, 32))
    after = layer.to_dense()
    assert not torch.allclose(after, before)  # the stored blocks were trained
    assert torch.count_nonzero(after * ~expand_mask(mask, (32, 32))) == 0  # pruned blocks stay zero


def test_cpu_inference_uses_a_dense_cache_that_follows_the_blocks():
    linear, mask = make_layer(block_shape=(32, 32))
    layer = BlockSparseLinear.from_dense(linear, mask).eval()
    x = torch.randn(4, 128)
    masked = linear.weight.detach() * expand_mask(mask, (32, 32))
    assert "dense_cache" not in layer.state_dict()  # never saved: the state dict holds the blocks only
    torch.testing.assert_close(layer.dense_cache, masked, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, masked, linear.bias), atol=1e-5, rtol=1e-5)
        layer.values.mul_(2)  # an in-place change bumps the version counter: the next eager call rebuilds
        torch.testing.assert_close(layer(x), F.linear(x, 2 * masked, linear.bias), atol=1e-5, rtol=1e-5)
    # loading blocks rebuilds it as well
    other = BlockSparseLinear.from_dense(make_layer(seed=5)[0], mask)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer.dense_cache, other.to_dense(), atol=0, rtol=0)


def test_compiled_inference_reads_the_cache_refreshed_by_eval():
    torch._dynamo.reset()
    linear, mask = make_layer(block_shape=(16, 32))
    layer = BlockSparseLinear.from_dense(linear, mask).eval()
    x = torch.randn(3, 128)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer.to_linear()(x), atol=1e-5, rtol=1e-5)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    F.mse_loss(layer(x), torch.zeros(3, 96)).backward()  # training mode: the custom op, gradients reach values
    opt.step()
    layer.eval()  # rebuilds the cache in place, so the compiled graph sees the new blocks
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer.to_linear()(x), atol=1e-5, rtol=1e-5)


def test_dense_cache_follows_dtype_and_device_moves():
    linear, mask = make_layer(block_shape=(32, 32))
    layer = BlockSparseLinear.from_dense(linear, mask).eval()
    x = torch.randn(4, 128, dtype=torch.float64)
    layer = layer.to(torch.float64)
    assert layer.dense_cache.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.to_linear()(x), atol=1e-10, rtol=1e-10)
    meta = BlockSparseLinear.from_dense(linear, mask).to("meta")  # off the CPU no dense copy is held
    assert meta.dense_cache.numel() == 0
    assert meta(torch.empty(4, 128, device="meta")).shape == (4, 96)


def test_fresh_module_is_usable_after_loading_blocks():
    linear, mask = make_layer()
    fresh = BlockSparseLinear(128, 96, (32, 32), nnz_blocks=3).eval()  # placeholder indices: no cache yet
    assert fresh.dense_cache.numel() == 0
    fresh.load_state_dict(BlockSparseLinear.from_dense(linear, mask).state_dict())
    x = torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), F.linear(x, linear.weight * expand_mask(mask, (32, 32)), linear.bias),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_weight_from_blocks_equals_to_dense(density: float) -> None:
    # the export path rebuilds the weight with shape-static ops; empty block-rows and an empty layer included
    linear = nn.Linear(48, 40)
    mask = torch.rand(5, 6) < density
    mask[2] = False  # a block-row with no kept block
    layer = BlockSparseLinear.from_dense(linear, mask)
    torch.testing.assert_close(layer.weight_from_blocks(), layer.to_dense(), atol=0, rtol=0)
