"""fxprune: a graph-rewriting pruning compiler for traced PyTorch vision models.

Example:
    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18(weights=None).eval()
    >>> pruned = fxprune.compile(model, {"stages": [{"kind": "channels", "target": {"flops": 0.5}}]},
    ...                          example_inputs=torch.randn(1, 3, 64, 64))

``fxprune.testing`` (the masked-equals-shrunk oracle) is imported on first use.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from . import criteria, ops, stages
from .analysis import Analysis, analyze
from .api import compile
from .errors import BudgetError, ExampleInputsError, FxPruneError, PlanError, RecipeError, RewriteError, TraceFailure
from .plan import Plan
from .recipe import Recipe
from .report import Report, report
from .serialize import load, save
from .stages import ChannelStage, Stage, register_stage
from .trace import record_shapes, register_autowrap_function, register_leaf, trace

__version__ = "0.1.0"

__all__ = [
    "compile", "report", "Report", "Recipe", "Stage", "ChannelStage", "Plan", "Analysis", "analyze", "trace",
    "record_shapes", "register_leaf", "register_autowrap_function", "register_stage", "FxPruneError", "RecipeError",
    "TraceFailure", "ExampleInputsError", "BudgetError", "PlanError", "RewriteError", "save", "load", "criteria",
    "ops", "stages",
]


def __getattr__(name: str) -> ModuleType:
    """``fxprune.testing`` without importing it (and torch.testing's helpers) on every ``import fxprune``."""
    if name == "testing":
        return importlib.import_module(f"{__name__}.testing")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
