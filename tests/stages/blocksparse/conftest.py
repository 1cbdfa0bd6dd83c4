"""Shared pieces of the block-sparsity tests: a small timm DeiT and an independent block-masking oracle."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def small_deit() -> nn.Module:
    """timm ``deit_tiny_patch16_224`` at 32x32 inputs (4 patches + cls token) with 2 blocks, random weights."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()


@pytest.fixture(scope="module")
def deit() -> nn.Module:
    return small_deit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _zero_blocks(model: nn.Module, entry: dict) -> nn.Module:
    """A deep copy of ``model`` whose dense linear weights are zero outside the blocks ``entry`` keeps.

    Written with plain loops over the entry's JSON, independently of ``rows_to_mask`` / ``BlockSparseLinear``.
    """
    masked = copy.deepcopy(model)
    for path, spec in entry["layers"].items():
        linear = masked.get_submodule(path)
        assert type(linear) is nn.Linear and [linear.out_features, linear.in_features] == spec["shape"]
        bn, bk = spec["block"]
        keep = torch.zeros_like(linear.weight, dtype=torch.bool)
        for r, cols in enumerate(spec["kept"]):
            for c in cols:
                keep[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] = True
        with torch.no_grad():
            linear.weight.mul_(keep)
    return masked


@pytest.fixture(scope="session")
def zero_blocks():
    """The oracle ``zero_blocks(model, entry)`` (see ``_zero_blocks``)."""
    return _zero_blocks
