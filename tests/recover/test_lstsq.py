"""``recover: [lstsq]`` against independent least-squares solutions (scipy on the raw activation matrices, not on
Gram matrices) for a Linear, a conv (im2col by ``F.unfold``), a grouped conv (per group) and a chain of two
consumers (sequential, cached or streamed: the second reads the refit first one; one streamed pass: it reads the
dense kept inputs)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.recover.capture import sample_positions

torch.manual_seed(0)


def _ridge_solution(x: np.ndarray, y: np.ndarray, w0: np.ndarray, ridge: float) -> np.ndarray:
    """``argmin ||[x, 1] w - y||² + λ ||w - w0||²`` with ``λ = ridge * mean(diag(xᵀx))``, by scipy's lstsq on the
    stacked system ``[[x, 1]; sqrt(λ) I] w = [y; sqrt(λ) w0]``."""
    a = np.hstack([x, np.ones((len(x), 1))])
    lam = ridge * float(np.mean(np.sum(x * x, 0)))
    if lam > 0:
        a = np.vstack([a, np.sqrt(lam) * np.eye(a.shape[1])])
        y = np.vstack([y, np.sqrt(lam) * w0])
    return scipy.linalg.lstsq(a, y)[0]


class MLP(nn.Module):
    def __init__(self, bias2: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 5, bias=bias2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _recipe(recover: list, target: float = 0.5) -> dict:
    return {"stages": [{"target": {"sparsity": target}, "criterion": "l2", "recover": recover}]}


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_linear_equals_scipy_least_squares(ridge: float) -> None:
    model = MLP(bias2=False).eval()
    data = [torch.randn(16, 6) for _ in range(4)]
    pruned = fxprune.compile(model, _recipe([{"lstsq": {"ridge": ridge}}]), example_inputs=data[0][:2], data=data)
    kept = pruned.fxprune_plan.kept["@fc1:0:0"]
    with torch.no_grad():
        h = torch.cat([torch.relu(model.fc1(x)) for x in data]).double().numpy()
        y = torch.cat([model.fc2(torch.relu(model.fc1(x))) for x in data]).double().numpy()
    w0 = np.vstack([model.fc2.weight.detach().double().numpy()[:, kept].T, np.zeros((1, 5))])
    want = _ridge_solution(h[:, kept], y, w0, ridge)
    got = pruned.fc2
    assert got.bias is not None  # lstsq fits a bias, added where the layer had none
    np.testing.assert_allclose(got.weight.detach().double().numpy(), want[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.bias.detach().double().numpy(), want[-1], rtol=1e-4, atol=1e-5)


class ConvNet(nn.Module):
    """conv1 -> ReLU -> conv2 (3x3, stride 2, no bias; grouped: 8 -> 8 in ``groups`` groups, then a 1x1 head)."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8 if groups > 1 else 6, 3, stride=2, padding=1, bias=False, groups=groups)
        self.head = nn.Conv2d(8, 4, 1) if groups > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv1(x))))


@pytest.mark.parametrize("products", ["float32", "float64"])
def test_conv_equals_scipy_least_squares_on_unfold_columns(products: str) -> None:
    model = ConvNet().eval()
    data = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    pruned = fxprune.compile(model, _recipe([{"lstsq": {"ridge": 0.0, "products": products}}], 0.25),
                             example_inputs=data[0][:1], data=data)
    kept = pruned.fxprune_plan.kept["@conv1:0:0"]
    with torch.no_grad():
        h = torch.cat([torch.relu(model.conv1(x)) for x in data])
        y = torch.cat([model.conv2(torch.relu(model.conv1(x))) for x in data])
    cols = F.unfold(h[:, kept], 3, padding=1, stride=2)  # [N, C*9, L]
    x_rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double().numpy()
    y_rows = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1]).double().numpy()
    want = _ridge_solution(x_rows, y_rows, np.zeros((x_rows.shape[1] + 1, 6)), 0.0)
    got = pruned.conv2
    np.testing.assert_allclose(got.weight.detach().double().reshape(6, -1).numpy(), want[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.bias.detach().double().numpy(), want[-1], rtol=1e-4, atol=1e-5)


def test_grouped_conv_is_solved_per_group() -> None:
    model = ConvNet(groups=4).eval()
    data = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    # conv1's outputs and conv2's groups (2 in + 2 out channels each) prune together
    pruned = fxprune.compile(model, _recipe([{"lstsq": {"ridge": 0.0}}], 0.5), example_inputs=data[0][:1],
                             data=data)
    kept = pruned.fxprune_plan.kept["@conv1:0:0"]
    assert pruned.conv2.groups == 2 and len(kept) == 4
    with torch.no_grad():
        h = torch.cat([torch.relu(model.conv1(x)) for x in data])
        y = torch.cat([model.conv2(torch.relu(model.conv1(x))) for x in data])
    kept_out = pruned.fxprune_plan.kept["@conv2:0:0"]
    for j in range(2):
        cin = kept[2 * j: 2 * j + 2]
        cout = kept_out[2 * j: 2 * j + 2]
        cols = F.unfold(h[:, cin], 3, padding=1, stride=2)
        x_rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double().numpy()
        y_rows = y[:, cout].flatten(2).transpose(1, 2).reshape(-1, 2).double().numpy()
        want = _ridge_solution(x_rows, y_rows, np.zeros((x_rows.shape[1] + 1, 2)), 0.0)
        w = pruned.conv2.weight.detach().double()[2 * j: 2 * j + 2].reshape(2, -1).numpy()
        np.testing.assert_allclose(w, want[:-1].T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pruned.conv2.bias.detach().double()[2 * j: 2 * j + 2].numpy(), want[-1],
                                   rtol=1e-4, atol=1e-5)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 10), nn.Linear(10, 9), nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("options, sequential", [({}, True), ({"cache_mb": 0, "passes": 0}, True),
                                                  ({"cache_mb": 0, "passes": 1}, False)])
def test_chain_order(options: dict, sequential: bool) -> None:
    """Cached (the default) and streamed with ``passes=0``: fc3 is fit on the activations of the model whose fc2 is
    already refit; streamed with ``passes=1``: on the dense model's fc3 input at the kept channels."""
    model = Chain().eval()
    data = [torch.randn(32, 5) for _ in range(3)]
    pruned = fxprune.compile(model, _recipe([{"lstsq": {"ridge": 0.0, **options}}]),
                             example_inputs=data[0][:2], data=data)
    plan = pruned.fxprune_plan.kept
    k1, k2 = plan["@fc1:0:0"], plan["@fc2:0:0"]
    with torch.no_grad():
        x = torch.cat(data)
        h1 = torch.relu(model.fc1(x))
        h2 = torch.relu(model.fc2(h1))
        y2, y3 = model.fc2(h1).double().numpy(), model.fc3(h2).double().numpy()
    w2 = _ridge_solution(h1[:, k1].double().numpy(), y2[:, k2], None, 0.0)
    np.testing.assert_allclose(pruned.fc2.weight.detach().double().numpy(), w2[:-1].T, rtol=1e-4, atol=1e-5)
    if sequential:  # the refit fc2 feeds fc3's regression
        x3 = np.maximum(h1[:, k1].double().numpy() @ w2[:-1] + w2[-1], 0)
    else:
        x3 = h2[:, k2].double().numpy()
    w3 = _ridge_solution(x3, y3, None, 0.0)
    np.testing.assert_allclose(pruned.fc3.weight.detach().double().numpy(), w3[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pruned.fc3.bias.detach().double().numpy(), w3[-1], rtol=1e-4, atol=1e-5)


def test_positions_are_sampled_evenly_and_deterministically() -> None:
    assert sample_positions(5, 8, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4]
    assert sample_positions(12, 4, torch.device("cpu")).tolist() == [0, 3, 6, 9]


class Conv1d3d(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv3d
        self.conv1, self.conv2 = conv(2, 6, 3, padding=1), conv(6, 3, 3, padding=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_columns(dims: int) -> None:
    """im2col by ``Tensor.unfold`` along each spatial dim (another mechanism than the gather fxprune uses)."""
    model = Conv1d3d(dims).eval()
    shape = (4, 2, 9) if dims == 1 else (2, 2, 5, 5, 5)
    data = [torch.randn(*shape) for _ in range(3)]
    pruned = fxprune.compile(model, _recipe([{"lstsq": {"ridge": 0.0}}]), example_inputs=data[0][:1], data=data)
    kept = pruned.fxprune_plan.kept["@conv1:0:0"]
    with torch.no_grad():
        h = torch.cat([torch.relu(model.conv1(x)) for x in data])[:, kept]
        y = torch.cat([model(x) for x in data])
    p = F.pad(h, [1, 1] * dims)
    for d in range(dims):
        p = p.unfold(2 + d, 3, 2)  # [N, C, *out, *kernel] once every spatial dim is unfolded
    n, c = p.shape[:2]
    out = p.shape[2:2 + dims]
    cols = p.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)).reshape(-1, c * 3 ** dims)
    y_rows = y.flatten(2).transpose(1, 2).reshape(-1, 3)
    assert y_rows.shape[0] == cols.shape[0] == n * int(np.prod(out))
    want = _ridge_solution(cols.double().numpy(), y_rows.double().numpy(), None, 0.0)
    np.testing.assert_allclose(pruned.conv2.weight.detach().double().reshape(3, -1).numpy(), want[:-1].T,
                               rtol=1e-4, atol=1e-5)
