"""``recover: [bn]``: the re-estimated running statistics equal a running-average pass computed by hand
(functional ops, every BatchNorm normalizing with its batch's statistics, dropout off), and PyTorch's own
``momentum=None`` cumulative average; train/eval flags are restored."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.recover import recover

torch.manual_seed(0)
EPS = 1e-5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _trained() -> Net:
    model = Net()
    model.train()
    with torch.no_grad():  # running statistics that differ from the calibration data's
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6) * 2 + 1)
    return model.eval()


def _by_hand(p: nn.Module, data: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm of the pruned model ``p``: mean over batches of the batch means / unbiased variances."""
    sums = [[0.0, 0.0], [0.0, 0.0]]
    for x in data:
        z1 = F.conv2d(x, p.conv1.weight, padding=1)
        m1, v1 = z1.mean((0, 2, 3)), z1.var((0, 2, 3), unbiased=False)
        a1 = torch.relu((z1 - m1[:, None, None]) / torch.sqrt(v1[:, None, None] + EPS) * p.bn1.weight[:, None, None]
                        + p.bn1.bias[:, None, None])
        z2 = F.conv2d(a1, p.conv2.weight, padding=1)
        for i, z in enumerate((z1, z2)):
            sums[i][0] = sums[i][0] + z.mean((0, 2, 3))
            sums[i][1] = sums[i][1] + z.var((0, 2, 3), unbiased=True)
    return [(m / len(data), v / len(data)) for m, v in sums]


def test_statistics_equal_a_running_average_by_hand() -> None:
    model = _trained()
    data = [torch.randn(4, 3, 6, 6) for _ in range(5)]
    recipe = {"stages": [{"target": {"sparsity": 0.5}, "criterion": "l2"}]}
    plain = fxprune.compile(model, recipe, example_inputs=data[0][:1])
    recipe["stages"][0]["recover"] = ["bn"]
    pruned = fxprune.compile(model, recipe, example_inputs=data[0][:1], data=data)
    assert pruned.fxprune_plan.kept == plain.fxprune_plan.kept and pruned.bn1.num_features == 4
    with torch.no_grad():
        want = _by_hand(plain, data)
    for bn, (mean, var) in zip((pruned.bn1, pruned.bn2), want, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    # the same as PyTorch's cumulative average (momentum=None) with only the BatchNorms in train mode
    ref = copy.deepcopy(plain)
    for bn in (ref.bn1, ref.bn2):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for x in data:
            ref(x)
    for got, bn in zip((pruned.bn1, pruned.bn2), (ref.bn1, ref.bn2), strict=True):
        torch.testing.assert_close(got.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(pruned.bn2.running_var, plain.bn2.running_var)  # it did change them


def test_train_eval_flags_are_restored() -> None:
    model = _trained()
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    plain = fxprune.compile(model, {"stages": [{"target": {"sparsity": 0.5}}]}, example_inputs=data[0][:1])
    dense = fxprune.trace(copy.deepcopy(model))
    fxprune.record_shapes(dense, (data[0][:1],))
    plain.train()
    plain.drop.eval()  # a mixed state comes back as it was
    flags = {name: m.training for name, m in plain.named_modules()}
    recover(dense, plain, plain.fxprune_plan, data, ["bn"])
    assert {name: m.training for name, m in plain.named_modules()} == flags
    assert all(not m.training for m in dense.modules())
