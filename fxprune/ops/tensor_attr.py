"""Helpers that slice a module's parameters and buffers in place, keeping their kind (Parameter or buffer)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def index_tensor(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(idx), dtype=torch.long, device=device)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` (4-d) or ``channels_last_3d`` (5-d) when ``t`` is laid out so and not also plainly
    contiguous; else ``contiguous_format``."""
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == ndim and t.is_contiguous(memory_format=fmt) and not t.is_contiguous():
            return fmt
    return torch.contiguous_format


def slice_attr(owner: nn.Module, name: str, dim: int, idx: np.ndarray | None) -> None:
    """Replace ``owner.<name>`` by its slice along ``dim`` (no-op when missing, ``None`` or ``idx is None``). The
    slice keeps the tensor's memory format (a ``channels_last`` conv weight stays ``channels_last``)."""
    value = getattr(owner, name, None)
    if idx is None or not isinstance(value, torch.Tensor):
        return
    new = value.detach().index_select(dim, index_tensor(idx, value.device))
    new = new.contiguous(memory_format=memory_format_of(value))
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
