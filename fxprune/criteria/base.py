"""Criterion protocol and registry. A criterion scores every unit of an ``Analysis``; low scores go first.

Criteria read parameter values only through the op rules' ``param_slices`` (tagged by role), never by op type.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..analysis import Analysis
from ..errors import RecipeError
from ..ir.space import arange


@dataclass
class ScoreContext:
    """What a criterion or stage may use besides the graph.

    ``data``: calibration data (an iterable of input batches, or of ``(inputs, labels)`` pairs);
    ``evaluate(model) -> float`` and ``finetune(model, step)``: user callbacks from ``fxprune.compile``;
    ``analysis_options``: options every stage adds to its own analysis options (and records in its plan), e.g.
    ``{"chunks": "even"}`` from ``output="module"``;
    ``reference``: the model as the user calls it, taking the graph's positional inputs, while the graph is still as
    traced (the first stage only): latency targets are fractions of its time; ``output``: what ``compile`` returns
    (``"graph"`` or ``"module"``), which decides how the traced graph's own overhead carries over to the result.
    """

    seed: int = 0
    data: Any = None
    example_inputs: tuple = ()
    evaluate: Any = None
    finetune: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    analysis_options: dict[str, Any] = field(default_factory=dict)
    reference: Callable[..., Any] | None = None
    output: str = "graph"


class Criterion(Protocol):
    name: str

    def score(self, analysis: Analysis, ctx: ScoreContext) -> np.ndarray:
        """One importance value per unit (``analysis.n_units``); frozen units' values are ignored."""


_CRITERIA: dict[str, Callable[[], Criterion]] = {}


def register_criterion(name: str) -> Callable[[type], type]:
    """Class decorator registering a criterion under ``name`` (the recipe's ``criterion`` field)."""

    def deco(cls: type) -> type:
        cls.name = name
        _CRITERIA[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str, field_path: str = "criterion") -> Criterion:
    if name not in _CRITERIA:
        close = difflib.get_close_matches(name, _CRITERIA, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(field_path, f"unknown criterion '{name}'{hint}; available: {', '.join(available())}")
    return _CRITERIA[name]()


def slot_values(analysis: Analysis, roles: Iterable[str], reduce: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Per slot, ``reduce`` of the parameter values with the given roles that the slot owns (0 if none).

    Only parameter-axis spaces carry values; units gather them through their slots.
    """
    roles = set(roles)
    out = np.zeros(int(analysis.sizes.sum()), np.float64)
    for i, space in enumerate(analysis.spaces):
        if not space.is_param:
            continue
        rule = analysis.param_rules[space.owner]
        n = int(analysis.sizes[i])
        for role, values in rule.param_slices(analysis.gm, space.owner[1:], space.dim, arange(n)):
            if role in roles:
                out[analysis.offsets[i]: analysis.offsets[i] + n] += reduce(values.float()).cpu().numpy()
    return out


def unit_sum(analysis: Analysis, per_slot: np.ndarray) -> np.ndarray:
    return np.bincount(analysis.slot_unit, weights=per_slot, minlength=analysis.n_units)
