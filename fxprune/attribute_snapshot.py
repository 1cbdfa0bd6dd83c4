"""Undo what a module writes to its own attributes during a shape-only (meta-device) run.

Shape recording runs modules on meta tensors. A module that caches something it computes from its input (the
Ultralytics ``Detect`` head keeps ``anchors``, ``strides`` and the ``shape`` they were made for) would keep meta
tensors after that run, and the next real call at the same shape would reuse them ("Tensor on device cpu is not
on the expected device meta"). ``restoring_attributes`` puts back every plain attribute of the module and its
submodules as it was before: rebound or added attributes, and the items of dict and list attributes (caches keyed
by shape or device). Parameters, buffers and submodules are left to ``torch.func.functional_call``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

#: nn.Module bookkeeping that is not the module's own state
_SKIP = frozenset({"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                   "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                   "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                   "_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_non_persistent_buffers_set"})


def _snapshot(m: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``{name: (value, shallow copy of its items or None)}`` of the module's plain attributes."""
    out = {}
    for k, v in vars(m).items():
        if k in _SKIP:
            continue
        items = dict(v) if type(v) is dict else list(v) if type(v) is list else None
        out[k] = (v, items)
    return out


def _same_items(v: Any, items: Any) -> bool:
    """Whether container ``v`` holds exactly the objects of its snapshot (by identity: values may be tensors)."""
    if len(v) != len(items):
        return False
    if type(v) is dict:
        return all(k in v and v[k] is x for k, x in items.items())
    return all(a is b for a, b in zip(v, items))


def _restore(m: nn.Module, saved: dict[str, tuple[Any, Any]]) -> None:
    state = vars(m)
    for k in [k for k in state if k not in _SKIP and k not in saved]:
        del state[k]
    for k, (v, items) in saved.items():
        if state.get(k) is not v:
            state[k] = v
        if items is not None and not _same_items(v, items):
            v.clear()
            if type(v) is dict:
                v.update(items)
            else:
                v.extend(items)


@contextlib.contextmanager
def restoring_attributes(module: nn.Module) -> Iterator[None]:
    """Inside, ``module`` and its submodules may rebind, add or mutate (dict/list) attributes; after, they are
    back as they were."""
    saved = [(m, _snapshot(m)) for m in module.modules()]
    try:
        yield
    finally:
        for m, snap in saved:
            _restore(m, snap)


__all__ = ["restoring_attributes"]
