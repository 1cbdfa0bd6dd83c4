"""Shared helpers for the digits pruning study: data, two small models, training and evaluation.

scikit-learn's ``load_digits`` (1797 grey 8x8 images, 10 classes) split 60/20/20 into train / validation / test.
The models are small enough to train on one CPU thread in seconds:
- ``DigitsCNN``: a residual block and a concatenation (the couplings fxprune must keep consistent);
- ``DigitsViT``: patch-embedding conv, two pre-norm blocks with attention written as Linear q/k/v + matmul +
  softmax (its heads and q/k/v features prune through the matmul rules) and a Linear/GELU MLP.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


@dataclass
class Split:
    x: torch.Tensor  # (N, 1, 8, 8) in [0, 1]
    y: torch.Tensor  # (N,) int64


def digits(seed: int = 0) -> tuple[Split, Split, Split]:
    """Train, validation and test splits (60/20/20, stratified)."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=d.target)
    va, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=d.target[rest])
    return tuple(Split(x[i], y[i]) for i in (tr, va, te))  # type: ignore[return-value]


def calibration(split: Split, per_class: int = 10, batch: int = 10,
                seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``per_class`` labeled samples of every class, shuffled, as ``(inputs, labels)`` batches."""
    g = np.random.default_rng(seed)
    idx = np.concatenate([g.choice(np.flatnonzero(split.y.numpy() == c), per_class, replace=False) for c in range(10)])
    idx = g.permutation(idx)
    return [(split.x[idx[i:i + batch]], split.y[idx[i:i + batch]]) for i in range(0, len(idx), batch)]


def _conv_bn(cin: int, cout: int, k: int = 3, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """stem -> residual block -> concat with a 1x1 side branch -> fuse -> pool -> head conv -> linear."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width)
        self.body = nn.Sequential(_conv_bn(width, 2 * width), _conv_bn(2 * width, width, relu=False))
        self.side = _conv_bn(width, width // 2, k=1)
        self.fuse = _conv_bn(width + width // 2, 2 * width)
        self.head = _conv_bn(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        r = F.relu(s + self.body(s))
        y = self.fuse(torch.cat([r, self.side(r)], 1))
        y = self.head(F.max_pool2d(y, 2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.q(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d)), dim=-1)
        return self.proj(torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class DigitsViT(nn.Module):
    """2x2 patches (16 tokens), learned position embedding, ``depth`` blocks, mean-pooled tokens -> linear head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, ratio: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.blocks(x)).mean(1))


def train(model: nn.Module, data: Split, epochs: int, lr: float, batch: int = 64, seed: int = 0,
          weight_decay: float = 0.0) -> nn.Module:
    """Adam with a cosine learning rate over ``epochs``; trains ``model`` in place and returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(data.y)
    total = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    """Top-1 accuracy in [0, 1] (the model is put in eval mode)."""
    model.eval()
    return float((model(data.x).argmax(1) == data.y).float().mean())


def finetuned(model: nn.Module, data: Split, epochs: int = 1, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A fine-tuned deep copy of ``model``."""
    return train(copy.deepcopy(model), data, epochs, lr, seed=seed)
