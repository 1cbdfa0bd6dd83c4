"""Hugging Face ``config`` fields after module-mode pruning.

A module-mode result keeps its ``config`` object (``save_pretrained`` writes it). Fields that still describe the
pruned model are updated: ``num_attention_heads`` when every attention module keeps the same number of heads,
``intermediate_size`` when every MLP keeps the same width, ``hidden_size`` when every LayerNorm of that width keeps
the same width, and ``head_dim`` when the kept head width is uniform but no longer ``hidden_size //
num_attention_heads``. A field whose layers ended up with different widths cannot describe them and is left unchanged
(with a log line): ``from_pretrained`` cannot rebuild such a model, ``fxprune.load`` can.

``hf_layout`` records, before pruning, which modules carry those sizes (by path); ``update_hf_config`` reads their
sizes afterwards. Attention modules (an int ``num_attention_heads`` / ``num_heads`` next to ``head_dim`` /
``attention_head_size``) also get their head count (and ``all_head_size``) updated, as the forward may read them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger(__name__)

_HEADS = ("num_attention_heads", "num_heads")
_HEAD_DIM = ("head_dim", "attention_head_size")


@dataclass
class HfLayout:
    """Paths of the modules whose sizes are ``config`` fields, recorded before pruning."""

    mlp: list[str] = field(default_factory=list)  # Linear layers of out_features == intermediate_size
    norms: list[str] = field(default_factory=list)  # LayerNorms over hidden_size
    attention: list[str] = field(default_factory=list)  # modules with a head count and a head dim


def _int_attr(m: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if type(getattr(m, n, None)) is int), None)


def hf_layout(model: nn.Module) -> HfLayout | None:
    """The modules of a Hugging Face model (one with a ``config`` holding ``hidden_size``) that carry config sizes;
    ``None`` for other models."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if config is None or type(hidden) is not int:
        return None
    inter = getattr(config, "intermediate_size", None)
    out = HfLayout()
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == inter and m.in_features == hidden:
            out.mlp.append(path)
        elif isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (hidden,):
            out.norms.append(path)
        elif _int_attr(m, _HEADS) and _int_attr(m, _HEAD_DIM):
            out.attention.append(path)
    return out


def _heads(m: nn.Module) -> int | None:
    """Heads left in an attention module: its first Linear's outputs over the head dim."""
    head_dim = getattr(m, _int_attr(m, _HEAD_DIM) or "", None)
    first = next((c for c in m.modules() if isinstance(c, nn.Linear)), None)
    if not head_dim or first is None or first.out_features % head_dim:
        return None
    return first.out_features // head_dim


def _set(config: object, name: str, values: set, what: str) -> str | None:
    if not values:
        return None
    if len(values) == 1:
        value = values.pop()
        if getattr(config, name) != value:
            log.info("module mode: config.%s = %d (was %d)", name, value, getattr(config, name))
            setattr(config, name, value)
        return None
    log.info("module mode: config.%s left at %s: %s differ (%s)", name, getattr(config, name), what, sorted(values))
    return name


def update_hf_config(model: nn.Module, layout: HfLayout | None) -> list[str]:
    """Update ``model.config`` (and attention modules' head counts) after pruning; returns the fields left
    unchanged because the layers differ."""
    if layout is None:
        return []
    config = model.config
    heads = set()
    for path in layout.attention:
        m = model.get_submodule(path)
        n = _heads(m)
        if n is None:
            continue
        heads.add(n)
        setattr(m, _int_attr(m, _HEADS), n)
        if type(getattr(m, "all_head_size", None)) is int:
            m.all_head_size = n * getattr(m, _int_attr(m, _HEAD_DIM))
    mlp = {getattr(model.get_submodule(p), "out_features", None) for p in layout.mlp} - {None}
    norms = {tuple(getattr(model.get_submodule(p), "normalized_shape", (None,)))[0] for p in layout.norms} - {None}
    dims = {getattr(m, _int_attr(m, _HEAD_DIM) or "", None) for m in map(model.get_submodule, layout.attention)}
    left = [_set(config, "num_attention_heads", heads, "heads per layer"),
            _set(config, "intermediate_size", mlp, "MLP widths"), _set(config, "hidden_size", norms, "widths")]
    _set_head_dim(config, dims - {None})
    return [name for name in left if name]


def _set_head_dim(config: object, dims: set) -> None:
    """``config.head_dim`` when the kept head width is uniform and ``hidden_size // num_attention_heads`` (what
    models without the field derive) no longer gives it: a rebuilt model then gets the pruned q/k/v widths."""
    if len(dims) != 1:
        return
    dim = dims.pop()
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    implied = getattr(config, "head_dim", None) or (hidden // heads if type(heads) is int and heads and
                                                   type(hidden) is int else None)
    if implied != dim:
        log.info("module mode: config.head_dim = %d (was %s)", dim, implied)
        setattr(config, "head_dim", dim)


__all__ = ["HfLayout", "hf_layout", "update_hf_config"]
