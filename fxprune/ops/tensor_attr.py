"""Helpers that slice a module's parameters and buffers in place, keeping their kind (Parameter or buffer)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def index_tensor(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(idx), dtype=torch.long, device=device)


def slice_attr(owner: nn.Module, name: str, dim: int, idx: np.ndarray | None) -> None:
    """Replace ``owner.<name>`` by its slice along ``dim`` (no-op when missing, ``None`` or ``idx is None``)."""
    value = getattr(owner, name, None)
    if idx is None or not isinstance(value, torch.Tensor):
        return
    new = value.detach().index_select(dim, index_tensor(idx, value.device))
    if isinstance(value, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=value.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = new
    else:
        setattr(owner, name, new)


def resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """Split an attribute path into its owning module and attribute name."""
    prefix, _, name = path.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), name
