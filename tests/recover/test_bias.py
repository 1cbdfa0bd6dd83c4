"""``recover: [bias]`` equals the masked model with the compensation computed by hand: a Linear consumer after a
ReLU, a padded conv consumer (border positions see fewer inputs), a pre-norm transformer MLP whose ``fc2`` feeds
the residual stream, and ``fxprune.save`` / ``load`` of a model whose consumer gained a bias."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

torch.manual_seed(0)


def _recipe(target: float = 0.5, recover: list | None = None) -> dict:
    return {"stages": [{"target": {"sparsity": target}, "criterion": "l2", "recover": recover or ["bias"]}]}


def _removed(kept: list[int], n: int) -> list[int]:
    return sorted(set(range(n)) - set(kept))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_linear_after_relu() -> None:
    model = MLP().eval()
    data = [torch.randn(16, 6) + 0.5 for _ in range(3)]
    pruned = fxprune.compile(model, _recipe(), example_inputs=data[0][:2], data=data)
    removed = _removed(pruned.fxprune_plan.kept["@fc1:0:0"], 10)
    w1, b1, w2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    mu = torch.cat([torch.relu(x @ w1.T + b1) for x in data])[:, removed].mean(0)  # E[relu(z)] of removed units
    x = torch.randn(5, 6)
    mask = torch.ones(10)
    mask[removed] = 0
    want = (torch.relu(x @ w1.T + b1) * mask) @ w2.T + w2[:, removed] @ mu
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-5)
    assert pruned.fc2.bias is not None and model.fc2.bias is None  # added to the result, never to the input model


class ConvNet(nn.Module):
    def __init__(self, **conv2: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 3, 3, bias=False, **conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("conv2", [{"padding": 1}, {"padding": 2, "stride": 2, "dilation": 2}])
def test_conv_with_padding(conv2: dict) -> None:
    model = ConvNet(**conv2).eval()
    data = [torch.randn(3, 2, 7, 7) + 0.3 for _ in range(2)]
    pruned = fxprune.compile(model, _recipe(), example_inputs=data[0][:1], data=data)
    removed = _removed(pruned.fxprune_plan.kept["@conv1:0:0"], 8)
    w2 = model.conv2.weight.detach()
    with torch.no_grad():
        h = torch.cat([torch.relu(model.conv1(x)) for x in data])
        # the removed channels' contribution at every output position, by im2col: columns of those channels only
        cols = F.unfold(h[:, removed], 3, **conv2)  # [N, R*9, positions]
        contribution = torch.einsum("ok,nkl->nol", w2[:, removed].reshape(3, -1), cols)
        delta = contribution.mean((0, 2))
        x = torch.randn(2, 2, 7, 7)
        masked = torch.relu(model.conv1(x))
        masked[:, removed] = 0
        want = F.conv2d(masked, w2, **conv2) + delta[None, :, None, None]
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-5)


class PreNormMLP(nn.Module):
    """``x + fc2(gelu(fc1(ln(x))))`` then a head: the hidden units prune; fc2's bias feeds the residual stream."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(F.gelu(self.fc1(self.ln(x))))
        return self.head(self.norm(x)).mean(1)


def test_transformer_mlp_through_the_residual() -> None:
    model = PreNormMLP().eval()
    data = [torch.randn(4, 5, 8) for _ in range(3)]  # [batch, tokens, dim]
    pruned = fxprune.compile(model, _recipe(), example_inputs=data[0][:1], data=data)
    removed = _removed(pruned.fxprune_plan.kept["@fc1:0:0"], 16)
    with torch.no_grad():
        act = torch.cat([F.gelu(model.fc1(model.ln(x))).reshape(-1, 16) for x in data])
        delta = model.fc2.weight[:, removed] @ act[:, removed].mean(0)  # mean over every sample and token
        x = torch.randn(2, 5, 8)
        hidden = F.gelu(model.fc1(model.ln(x)))
        hidden[..., removed] = 0
        stream = x + model.fc2(hidden) + delta
        want = model.head(model.norm(stream)).mean(1)
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-5)


def test_added_bias_survives_save_and_load(tmp_path: Path) -> None:
    model = MLP().eval()
    data = [torch.randn(8, 6) for _ in range(2)]
    x = data[0][:2]
    pruned = fxprune.compile(model, _recipe(recover=["bias", "lstsq"]), example_inputs=x, data=data)
    path = fxprune.save(pruned, tmp_path / "mlp.fxp", example_inputs=x)
    again = fxprune.load(path, MLP)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
