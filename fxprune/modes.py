"""Running models for measurement without leaving a trace: eval mode and no gradients, flags restored after."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_no_grad(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode and no gradients inside; each module's training flag restored after."""
    flags = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag


__all__ = ["eval_no_grad"]
