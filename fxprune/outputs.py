"""Flattening model outputs (tensors nested in tuples, lists, dicts, named tuples and dataclasses) into a list of
tensors."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


def tensors_of(out: Any) -> list[torch.Tensor]:
    """Every tensor in ``out``, depth first, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_of(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors_of(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in tensors_of(getattr(out, f.name))]
    return []
