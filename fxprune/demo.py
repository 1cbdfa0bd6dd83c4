"""The ``fxprune demo``: train a small residual + concat CNN on scikit-learn's 8x8 digits, prune it to half its
MACs, fine-tune it briefly and compare. Everything runs on the CPU in seconds.

Needs scikit-learn (``pip install fxprune[test]``) for the data set.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .api import compile as fx_compile
from .testing import assert_masked_equals_shrunk

log = logging.getLogger(__name__)

DEFAULT_RECIPE: dict[str, Any] = {"stages": [{"kind": "channels", "target": {"flops": 0.5}, "criterion": "l2"}]}


class DigitsNet(nn.Module):
    """A CNN for 1x8x8 digits with the couplings fxprune handles: a residual add and a channel concat."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                                 nn.ReLU(), nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(width))
        self.wide = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.narrow = nn.Sequential(nn.Conv2d(width, width // 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(width + width // 2, 2 * width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        r = F.relu(s + self.res(s))                                   # residual: ties stem and res outputs
        c = torch.cat([self.wide(r), self.narrow(r)], dim=1)          # concat: each branch maps to its offset
        h = self.head(F.max_pool2d(c, 2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


@dataclass
class Digits:
    """Train / test tensors of the digits data set, pixels scaled to [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int = 0) -> Digits:
    """scikit-learn's digits (1,797 8x8 images), split 80/20, stratified."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a test extra
        raise ImportError("the demo needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    i_train, i_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=bunch.target)
    return Digits(x[i_train], y[i_train], x[i_test], y[i_test])


def train(model: nn.Module, data: Digits, epochs: int, lr: float, desc: str, batch: int = 64) -> None:
    """Adam with a cosine schedule over ``epochs`` passes; a tqdm bar shows the loss (on stderr)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(data.y_train) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False)
    for _ in bar:
        order = torch.randperm(len(data.y_train))
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(order):.3f}")
    bar.close()
    model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``x``."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@dataclass
class DemoResult:
    """The models and accuracies of one demo run; ``example`` is one batch of test images."""

    original: nn.Module
    pruned: nn.Module
    example: torch.Tensor
    acc_before: float
    acc_pruned: float
    acc_finetuned: float
    recipe: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_RECIPE))


def run(quick: bool = False, recipe: dict | None = None, seed: int = 0) -> DemoResult:
    """Train ``DigitsNet``, prune it with ``recipe`` (default: half the MACs, ``l2``) and fine-tune the result.

    Args:
        quick: fewer epochs (4 + 2 instead of 20 + 6), for a run of a few seconds.
        recipe: a channel recipe; ``DEFAULT_RECIPE`` when omitted.
        seed: seeds the split, the initialisation and the batch order.
    """
    torch.manual_seed(seed)
    recipe = copy.deepcopy(recipe or DEFAULT_RECIPE)
    data = load_data(seed)
    epochs, tune = (4, 2) if quick else (20, 6)
    model = DigitsNet()
    train(model, data, epochs, 1e-2, "train")
    acc_before = accuracy(model, data.x_test, data.y_test)
    log.info("trained DigitsNet for %d epochs: test accuracy %.4f", epochs, acc_before)
    example = data.x_test[:64]
    pruned = fx_compile(model, recipe, example_inputs=example)
    assert_masked_equals_shrunk(model, pruned.fxprune_plan, (example,), pruned, atol=1e-3)
    acc_pruned = accuracy(pruned, data.x_test, data.y_test)
    train(pruned, data, tune, 3e-3, "fine-tune")
    acc_finetuned = accuracy(pruned, data.x_test, data.y_test)
    log.info("pruned: %.4f, fine-tuned for %d epochs: %.4f", acc_pruned, tune, acc_finetuned)
    return DemoResult(model, pruned, example, acc_before, acc_pruned, acc_finetuned, recipe)


__all__ = ["DigitsNet", "Digits", "DemoResult", "DEFAULT_RECIPE", "load_data", "train", "accuracy", "run"]
