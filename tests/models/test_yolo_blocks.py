"""YOLO-style concatenation detectors (seed: iterative filter pruning for concat CNNs, arXiv 2405.03715):
ELAN, C2f, SPPF and RepConv blocks, an upsample + cat neck and detect heads. Masked == shrunk, and the detect
convs' outputs are never pruned."""
from __future__ import annotations

import torch
from torch import nn

from fxprune.testing import analyze_model, channel_recipe, frozen_of, prune_and_check


def cbs(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class ELAN(nn.Module):
    """Two 1x1 branches, a chain of 3x3 convs, four outputs concatenated (cat of many branches)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.b1, self.b2 = cbs(c, h), cbs(c, h)
        self.chain = nn.ModuleList([cbs(h, h, 3) for _ in range(4)])
        self.out = cbs(4 * h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [self.b1(x), self.b2(x)]
        y = ys[-1]
        for i, m in enumerate(self.chain):
            y = m(y)
            if i % 2 == 1:
                ys.append(y)
        return self.out(torch.cat(ys, 1))


class C2f(nn.Module):
    """YOLOv8: conv, chunk in two, bottlenecks with residuals appended, cat of all pieces."""

    def __init__(self, c: int, n: int = 2) -> None:
        super().__init__()
        self.h = c // 2
        self.cv1, self.cv2 = cbs(c, 2 * self.h), cbs((2 + n) * self.h, c)
        self.m = nn.ModuleList(nn.Sequential(cbs(self.h, self.h, 3), cbs(self.h, self.h, 3)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """One producer feeds four slices of one cat through chained max-pools."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = cbs(c, c // 2), cbs(2 * c, c)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class RepConv(nn.Module):
    """3x3 + 1x1 + identity-BN branches summed: all three are pruned with the same indices."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.id = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.k3(x) + self.k1(x) + self.id(x))


class TinyYOLO(nn.Module):
    def __init__(self, nc: int = 3) -> None:
        super().__init__()
        self.stem = cbs(3, 16, 3, 2)
        self.s1 = nn.Sequential(cbs(16, 32, 3, 2), ELAN(32))
        self.s2 = nn.Sequential(cbs(32, 64, 3, 2), C2f(64), SPPF(64), RepConv(64))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.neck = C2f(96)
        self.detect = nn.ModuleList([nn.Conv2d(96, 5 + nc, 1), nn.Conv2d(64, 5 + nc, 1)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.s1(self.stem(x))
        p4 = self.s2(p3)
        n3 = self.neck(torch.cat([self.up(p4), p3], 1))
        return self.detect[0](n3), self.detect[1](p4)


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


X = torch.randn(2, 3, 32, 32)


def test_detect_outputs_are_frozen_and_blocks_prunable() -> None:
    model = _randomize_bn(TinyYOLO()).eval()
    a = analyze_model(model, X)
    assert frozen_of(a, "@detect.0:0:0").all() and frozen_of(a, "@detect.1:0:0").all()
    for key in ("@s1.1.chain.0.0:0:0", "@s2.1.m.0.0.0:0:0", "@s2.2.cv1.0:0:0", "@neck.cv1.0:0:0"):
        assert not frozen_of(a, key).any(), key


def test_tiny_yolo_masked_equals_shrunk_at_half_flops() -> None:
    model = _randomize_bn(TinyYOLO()).eval()
    pruned = prune_and_check(model, channel_recipe(0.5, "flops"), X)
    assert pruned.get_submodule("detect.0").out_channels == 8 and pruned.get_submodule("detect.1").out_channels == 8
    assert pruned.get_submodule("s2.2.cv1.0").out_channels < 32  # SPPF producer feeding four cat slices shrank
    k3, k1, bn = (pruned.get_submodule(f"s2.3.{n}") for n in ("k3.0", "k1.0", "id"))
    assert k3.out_channels == k1.out_channels == bn.num_features < 64  # RepConv branches pruned together


def test_tiny_yolo_every_criterion_and_round_to() -> None:
    model = _randomize_bn(TinyYOLO()).eval()
    for criterion in ("l1", "bn_scale", "random"):
        prune_and_check(model, channel_recipe(0.3, "sparsity", criterion=criterion, round_to=2, scope="global"), X)
