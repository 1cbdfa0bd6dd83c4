"""The cached, exactly sequential mode of ``recover`` (``fxprune/recover/sequential.py``, the default when the
calibration activations fit in ``cache_mb``), checked against properties of the *final* model, computed by hand:

* every refit layer equals scipy's least-squares solution on the final model's own input of that layer (im2col by
  ``F.unfold``) against the dense model's output, so each layer saw the upstream layers' final weights;
* every BatchNorm's running statistics are the batch-averaged mean and unbiased variance of its input in the final
  model (eval mode), so each saw the upstream BatchNorms' final statistics;
* without ``bn`` it gives the streamed ``passes: 0`` weights; over ``cache_mb`` it falls back to the streamed mode
  and gives its weights exactly.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from fixtures import ResCatNet
from torch import nn

import fxprune

torch.manual_seed(0)


class Net(nn.Module):
    """conv-bn-relu x 3 and a linear head: conv2, conv3 and fc read pruned channels."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = torch.relu(self.bn3(self.conv3(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _trained(model: nn.Module, shape: tuple) -> nn.Module:
    model.train()
    with torch.no_grad():  # running statistics of another distribution than the calibration batches
        for _ in range(3):
            model(torch.randn(*shape) * 1.5 + 0.5)
    return model.eval()


def _inputs(model: nn.Module, data: list, paths: list[str]) -> dict[str, list[torch.Tensor]]:
    """Each module's input on every batch, in eval mode."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0].clone()))
               for p in paths]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return seen


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return scipy.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y)[0]


def test_every_layer_is_fit_on_the_final_models_activations() -> None:
    model = _trained(Net(), (8, 3, 8, 8))
    data = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    recipe = {"stages": [{"target": {"sparsity": 0.5}, "criterion": "l2",
                          "recover": ["bn", "bias", {"lstsq": {"ridge": 0.0}}]}]}
    pruned = fxprune.compile(model, recipe, example_inputs=data[0][:1], data=data)
    plan = pruned.fxprune_plan.kept
    layers = ["conv2", "conv3", "fc"]
    final = _inputs(pruned, data, layers + ["bn1", "bn2", "bn3"])
    dense_out = {p: [] for p in layers}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, y, p=p: dense_out[p].append(y))
             for p in layers]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    for p in layers:
        m = pruned.get_submodule(p)
        x, y = torch.cat(final[p]), torch.cat(dense_out[p])
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, padding=m.padding, stride=m.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            y_rows = y[:, plan[f"@{p}:0:0"]].flatten(2).transpose(1, 2).reshape(-1, m.out_channels)
        else:
            rows, y_rows = x, y
        want = _lstsq(rows.double().numpy(), y_rows.double().numpy())
        np.testing.assert_allclose(m.weight.detach().double().reshape(len(want[0]), -1).numpy(), want[:-1].T,
                                   rtol=1e-3, atol=1e-4, err_msg=p)
        np.testing.assert_allclose(m.bias.detach().double().numpy(), want[-1], rtol=1e-3, atol=1e-4, err_msg=p)
    for p in ["bn1", "bn2", "bn3"]:
        bn = pruned.get_submodule(p)
        xs = [x.double() for x in final[p]]
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), correction=1) for x in xs]).mean(0)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6, msg=p)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6, msg=p)


def _recovered(model: nn.Module, data: list, recover: list) -> nn.Module:
    recipe = {"stages": [{"target": {"flops": 0.4}, "ignore": ["fuse"], "recover": recover}]}
    return fxprune.compile(model, recipe, example_inputs=data[0][:1], data=data)


def test_without_bn_it_equals_the_streamed_sequential_mode() -> None:
    model = _trained(ResCatNet(width=8, fuse=16, classes=3), (8, 3, 6, 6))
    data = [torch.randn(6, 3, 6, 6) for _ in range(3)]
    cached = _recovered(model, data, ["bias", "lstsq"])
    streamed = _recovered(model, data, ["bias", {"lstsq": {"cache_mb": 0, "passes": 0}}])
    for key, value in streamed.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("recover", [["bias", "lstsq"], ["bn", "bias", "lstsq"]])
def test_over_the_budget_it_streams(recover: list, caplog: pytest.LogCaptureFixture) -> None:
    """At 48x48 the stem's activations of three batches (3 x 6 x 8 x 48 x 48 floats, several tensors live) exceed
    1 MiB: the result is the streamed mode's, bit for bit."""
    model = _trained(ResCatNet(width=8, fuse=16, classes=3), (8, 3, 48, 48))
    data = [torch.randn(6, 3, 48, 48) for _ in range(3)]
    opts = {"cache_mb": 1}
    with caplog.at_level(logging.INFO, logger="fxprune.recover"):
        over = _recovered(model, data, [r if r != "lstsq" else {"lstsq": opts} for r in recover])
    assert "exceed cache_mb 1" in caplog.text
    streamed = _recovered(model, data, [r if r != "lstsq" else {"lstsq": {"cache_mb": 0}} for r in recover])
    assert fxprune.testing.state_digest(over) == fxprune.testing.state_digest(streamed)
    if "bn" in recover:  # within the default budget, bn is re-estimated sequentially: other statistics
        cached = _recovered(model, data, recover)
        assert fxprune.testing.state_digest(cached) != fxprune.testing.state_digest(streamed)
