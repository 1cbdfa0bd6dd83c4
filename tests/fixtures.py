"""Small models shared by test modules in several folders (``tests/`` is on ``sys.path`` through its conftest)."""
from __future__ import annotations

import torch
from torch import nn


class ResCatNet(nn.Module):
    """A small test network with a residual add, a concatenation, a flatten and a linear head.

    stem (width) -> body (2 * width -> width) added back -> cat with a side branch (width // 2) -> fuse -> fc.
    """

    def __init__(self, width: int = 16, fuse: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                                  nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.side = nn.Conv2d(width, width // 2, 1)
        self.fuse = nn.Conv2d(width + width // 2, fuse, 1)
        self.fc = nn.Linear(fuse, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        r = torch.relu(s + self.body(s))
        y = self.fuse(torch.cat([r, self.side(r)], 1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class TinyProposal(nn.Module):
    """A small ConvNet returning a (B, C, h, w) map: PaPr's proposal network at test size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
