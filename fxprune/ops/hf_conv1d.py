"""Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``; GPT-2's attention and MLP layers): a linear layer whose
weight is stored transposed, ``(in_features, out_features)``, with ``nf`` output features. Param axis 0 = output
features (weight columns, bias), axis 1 = input features (weight rows); leading dims pass through."""
from __future__ import annotations

from torch import nn

from .linear import LinearRule
from .registry import register_installed


class Conv1DRule(LinearRule):
    """A linear layer's ties, slices and counts (``LinearRule``) on the transposed weight."""

    weight_axes = (1, 0)

    @staticmethod
    def features(m: nn.Module) -> tuple[int, int]:
        return int(m.weight.shape[1]), int(m.weight.shape[0])

    @staticmethod
    def set_features(m: nn.Module) -> None:
        m.nx, m.nf = m.weight.shape


def register() -> None:
    """Register the rule for the installed transformers' ``Conv1D`` (once; only if transformers is imported)."""
    register_installed("transformers.pytorch_utils", ["Conv1D"], Conv1DRule)
