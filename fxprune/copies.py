"""Working copies that share weight storage with the user's model until they are shrunk.

``compile`` used to deep-copy the model before tracing it: for a 2.6 GB network that doubled the memory before any
pruning began. ``shared_copy`` copies every module but lets each parameter and buffer alias the original's storage
(new ``Parameter``/tensor objects, so ``.grad``, ``requires_grad`` and module attributes stay private). Shrinking
replaces the tensors it slices, never writing into them; ``unshare`` then clones whatever still aliases the
original, so the result never shares memory with the user's model. The peak is the original plus the shrunk model.

Code that may write into the copy's tensors in place (user callbacks, training, statistic re-estimation) must run on
a deep copy or after ``unshare``.
"""
from __future__ import annotations

import copy
import itertools
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def shared_copy(model: M) -> M:
    """A deep copy of ``model`` whose parameters and buffers alias the original's storage (tied weights stay tied)."""
    memo: dict[int, object] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = t.detach()
    return copy.deepcopy(model, memo)


def _storage(t: torch.Tensor) -> int:
    if t.device.type == "meta":
        return 0
    return t.untyped_storage().data_ptr()


def unshare(module: nn.Module, original: nn.Module) -> int:
    """Clone, in place in ``module``, every parameter and buffer whose storage belongs to ``original``; returns how
    many tensors were cloned. Tied tensors stay tied (one clone per tensor object)."""
    owned = {_storage(t) for t in itertools.chain(original.parameters(), original.buffers())} - {0}
    clones: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or _storage(t) not in owned:
                    continue
                if id(t) not in clones:
                    data = t.detach().clone()
                    clones[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else data
                table[name] = clones[id(t)]
    return len(clones)


__all__ = ["shared_copy", "unshare"]
