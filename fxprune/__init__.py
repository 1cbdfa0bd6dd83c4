"""fxprune: a graph-rewriting pruning compiler for traced PyTorch vision models.

Example:
    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18(weights=None).eval()
    >>> pruned = fxprune.compile(model, {"stages": [{"kind": "channels", "target": {"flops": 0.5}}]},
    ...                          example_inputs=torch.randn(1, 3, 64, 64))
"""
from . import criteria, ops, testing  # noqa: F401  (registers op rules and criteria)
from .api import compile
from . import blocksparse  # noqa: F401,E402  (registers the blocksparse stage, criteria and rewrite)
from . import patches  # noqa: F401,E402  (registers the patches stage and rewrite)
from . import partial  # noqa: F401,E402  (partial tracing: recipe 'submodule')
from . import head_dim, heads  # noqa: F401,E402  (registers the heads and head_dim stages)
from .errors import BudgetError, ExampleInputsError, FxPruneError, PlanError, RecipeError, RewriteError, TraceFailure
from .graph.dependency import Analysis, analyze
from .plan import Plan
from .recipe import ChannelStage, Recipe, register_stage
from .report import Report, report
from .serialize import load, save
from .trace import record_shapes, register_autowrap_function, register_leaf, trace

__version__ = "0.1.0"

__all__ = [
    "compile", "report", "Report", "Recipe", "ChannelStage", "Plan", "Analysis", "analyze", "trace", "record_shapes",
    "register_leaf", "register_autowrap_function", "register_stage", "FxPruneError", "RecipeError", "TraceFailure",
    "ExampleInputsError", "BudgetError", "PlanError", "RewriteError", "save", "load",
]
