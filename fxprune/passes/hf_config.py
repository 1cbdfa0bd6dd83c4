"""Hugging Face ``config`` fields after module-mode pruning (placeholder, filled below)."""
from __future__ import annotations

from torch import nn


def update_hf_config(model: nn.Module) -> list[str]:
    return []
