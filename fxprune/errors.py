"""Exceptions raised by fxprune. Each names the node, module or recipe field at fault."""
from __future__ import annotations


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class RecipeError(FxPruneError, ValueError):
    """A recipe field is missing, unknown or out of range. The message starts with the field path."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"recipe field '{field}': {message}")


class TraceFailure(FxPruneError):
    """torch.fx could not trace the model; the message names the module and source line."""


class ExampleInputsError(FxPruneError, ValueError):
    """The example inputs do not run through the model."""


class BudgetError(FxPruneError):
    """The requested budget cannot be met with what may be pruned."""


class PlanError(FxPruneError):
    """A plan does not fit the graph it is applied to."""


class RewriteError(FxPruneError):
    """A rewrite produced a graph that does not match the plan's predicted shapes."""


class ModuleModeError(FxPruneError):
    """``output="module"`` cannot apply a plan to the model's own forward (a graph constant its code does not read
    from a module attribute or a tensor size, an inserted node with no place in the module tree); the message names
    the node and its source line, and ``output="graph"`` works."""
