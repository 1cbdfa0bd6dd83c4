"""What a stage is: one ``Stage`` base class, one registry (``register_stage``) and the shared budget fields.

A stage kind is a dataclass that subclasses ``Stage`` (or ``PruningStage``, which declares the budget fields the
pruning kinds share) and is registered under its recipe ``kind`` with ``@register_stage("kind")``. The class is
both the recipe schema of its kind and its runner: ``validate(path)`` checks the fields without changing them,
``normalized()`` returns the canonical copy a parsed recipe holds, and ``run(gm, ctx)`` prunes the traced graph
in place and returns the ``Plan`` of what it did.

Example:
    >>> @register_stage("noop")
    ... @dataclass
    ... class NoOpStage(Stage):
    ...     def run(self, gm, ctx):
    ...         return Plan()
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch.fx as fx

from ..criteria import ScoreContext, get_criterion
from ..errors import RecipeError
from ..plan import Plan
from ..planner import Budget
from ..recover import validate_recover

_STAGES: dict[str, type[Stage]] = {}


@dataclass
class Stage:
    """Base of every stage kind's config.

    Class attributes:
        kind: the recipe ``kind`` (set by ``register_stage``).
        VERSION: version of this kind's fields (1 for every kind of recipe schema version 1).
        rewrites_graph: the stage rewrites the graph beyond channel slicing and records a ``Plan.rewrites`` entry;
            such stages come after every channel-shrinking stage of a recipe.
    """

    kind: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    rewrites_graph: ClassVar[bool] = False

    def validate(self, path: str) -> None:
        """Raise ``RecipeError`` naming the field (``path`` is e.g. ``stages[0]``) unless every field is valid.
        Never changes a field."""

    def normalized(self) -> Stage:
        """A copy with canonical field values (numbers as floats, shorthands expanded), the form a parsed recipe
        holds; call after ``validate``."""
        return dataclasses.replace(self)

    def run(self, gm: fx.GraphModule, ctx: ScoreContext) -> Plan:
        """Prune ``gm`` (traced, shapes recorded) in place; return the plan of what was done (original indices).
        ``ctx.example_inputs`` are the inputs shapes were recorded with."""
        raise NotImplementedError(f"stage kind '{self.kind}' ({type(self).__name__}) does not implement run()")

    def writes_weights(self) -> bool:
        """Whether ``run`` writes parameter or buffer values in place beyond slicing them (e.g. ``recover``):
        ``fxprune.compile`` then works on a private deep copy, never on one that aliases the user's weights."""
        return False

    def summary(self) -> str:
        """This stage in one line, for logs and the command line (``channels flops=0.5 by l2``)."""
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        """The recipe mapping of this stage: ``kind`` first, then its fields."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str) -> Stage:
        """The stage of one recipe mapping (its ``kind`` already resolved to ``cls``); ``RecipeError`` at ``path``
        for an unknown field. Field values are not checked yet: ``Recipe`` validates its stages together."""
        check_fields(data, cls, path, extra=("kind",))
        return cls(**{k: v for k, v in data.items() if k != "kind"})


S = TypeVar("S", bound=Stage)


def register_stage(kind: str) -> Callable[[type[S]], type[S]]:
    """Class decorator registering a ``Stage`` dataclass as the recipe stage ``kind`` (and setting its ``kind``)."""

    def deco(cls: type[S]) -> type[S]:
        if not (isinstance(cls, type) and issubclass(cls, Stage) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"register_stage({kind!r}): {cls!r} must be a dataclass subclassing "
                            f"fxprune.stages.Stage")
        cls.kind = kind
        _STAGES[kind] = cls
        return cls

    return deco


def stage_class(kind: str, path: str) -> type[Stage]:
    """The class registered as ``kind``; ``RecipeError`` at ``path`` listing the kinds when there is none."""
    cls = _STAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RecipeError(path, f"unknown stage kind '{kind}'; available: {', '.join(stage_kinds())}")
    return cls


def stage_kinds() -> list[str]:
    """The registered stage kinds, sorted."""
    return sorted(_STAGES)


# -- validation helpers (never mutate) -----------------------------------------------------------------------------
def check_fields(data: Mapping[str, Any], cls: type, path: str, extra: tuple[str, ...] = ()) -> None:
    """``RecipeError`` for the first key of ``data`` that is not a field of the dataclass ``cls`` (or in ``extra``)."""
    names = {f.name for f in dataclasses.fields(cls)} | set(extra)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{path}.{key}" if path else str(key),
                              f"unknown field{hint}; known: {', '.join(sorted(names))}")


def fraction(value: Any, path: str) -> float:
    """``value`` as a float in [0, 1); ``RecipeError`` at ``path`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(path, f"must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise RecipeError(path, f"must be in [0, 1), got {value}")
    return float(value)


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_patterns(value: Any, path: str) -> None:
    """A list of module-path glob patterns."""
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise RecipeError(path, f"must be a list of module-path glob patterns, got {value!r}")


def validate_round_to(value: Any, path: str) -> None:
    """An integer >= 1, ``"auto"``, or a mapping of group keys to integers >= 1."""
    if value == "auto":
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"{path}.{k}", f"a group's step must be an integer >= 1, got {v!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(path, f"must be an integer >= 1, 'auto', or a mapping of group keys to steps, got {value!r}")


def validate_counts(stage: Any, path: str, names: tuple[str, ...]) -> None:
    """Each field in ``names`` is an integer >= 1."""
    for name in names:
        v = getattr(stage, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RecipeError(f"{path}.{name}", f"must be an integer >= 1, got {v!r}")


@dataclass
class PruningStage(Stage):
    """A stage that removes a ``target`` fraction of something, ranked by a ``criterion``: the shared budget fields.

    Fields:
        target: exactly one of ``TARGETS`` mapped to a fraction in [0, 1) (e.g. ``{"flops": 0.5}``).
        criterion: the name of a registered criterion.
        ignore: glob patterns of module paths that never change.
        max_sparsity: at most this fraction of one group (or layer) is removed.
    """

    target: dict = field(default_factory=lambda: {"sparsity": 0.5})
    criterion: str = "l2"
    ignore: list = field(default_factory=list)
    max_sparsity: float = 0.9
    TARGETS: ClassVar[tuple[str, ...]] = ("sparsity", "flops", "params")

    @property
    def target_kind(self) -> str:
        return str(next(iter(self.target)))

    @property
    def target_value(self) -> float:
        return float(next(iter(self.target.values())))

    def summary(self) -> str:
        return f"{self.kind} {self.target_kind}={self.target_value:g} by {self.criterion}"

    def validate_target(self, path: str) -> None:
        """``target`` holds exactly one of ``TARGETS``, a fraction in [0, 1)."""
        if not isinstance(self.target, dict) or len(self.target) != 1:
            raise RecipeError(f"{path}.target", f"must hold exactly one of {', '.join(self.TARGETS)}, "
                                                f"got {self.target!r}")
        (key, value), = self.target.items()
        if key not in self.TARGETS:
            raise RecipeError(f"{path}.target.{key}", f"unknown target; use one of {', '.join(self.TARGETS)}")
        fraction(value, f"{path}.target.{key}")

    def validate_criterion(self, path: str) -> None:
        """``criterion`` names a registered channel criterion (block stages check their own registry)."""
        get_criterion(self.criterion, f"{path}.criterion")

    def validate_budget(self, path: str) -> None:
        """``ignore`` patterns and ``max_sparsity`` in (0, 1)."""
        if not isinstance(self.ignore, list) or not all(isinstance(p, str) for p in self.ignore):
            raise RecipeError(f"{path}.ignore", f"must be a list of module-path patterns, got {self.ignore!r}")
        m = self.max_sparsity
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1:
            raise RecipeError(f"{path}.max_sparsity", f"must be in (0, 1), got {m!r}")

    def normalized(self) -> PruningStage:
        (key, value), = self.target.items()
        return dataclasses.replace(self, target={key: float(value)})


@dataclass
class ChannelPruningStage(PruningStage):
    """A pruning stage that removes channel units through the ``Planner``: adds ``round_to`` and ``seed``, and the
    ``latency`` target (``{"latency": f}``: remove the fraction ``f`` of the model's latency measured on the example
    inputs' device, dtype and batch size at the current thread count; see ``stages/latency_target.py``).

    Fields:
        round_to: kept units per group rounded up to a multiple of this; ``"auto"``: per group, the width step where
            its heaviest layer's measured latency curve has its steps (recorded in ``Plan.round_to``); or a mapping
            group key -> step (the form ``Plan.round_to`` records: replays an ``auto`` choice without measuring).
        seed: seed of random criteria.
    """

    round_to: Any = 1
    seed: int = 0
    TARGETS: ClassVar[tuple[str, ...]] = ("sparsity", "flops", "params", "latency")

    def budget(self) -> Budget:
        """What the ``Planner`` needs of this stage (subclasses add their ``scope`` and module families);
        ``round_to: "auto"`` is resolved by the stage run (``latency_target.resolve_budget``)."""
        r = self.round_to
        if isinstance(r, dict):
            return Budget(max_sparsity=float(self.max_sparsity), group_round_to={k: int(v) for k, v in r.items()})
        return Budget(max_sparsity=float(self.max_sparsity), round_to=r if isinstance(r, int) else 1)

    def validate_budget(self, path: str) -> None:
        super().validate_budget(path)
        validate_round_to(self.round_to, f"{path}.round_to")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError(f"{path}.seed", f"must be an integer, got {self.seed!r}")


@dataclass
class RecoveringStage(ChannelPruningStage):
    """A channel pruning stage that can repair the pruned layers without training: adds ``recover``.

    Fields:
        recover: training-free recovery after pruning, on the ``data`` batches: any of ``bn``, ``bias``,
            ``lstsq`` (or ``{"lstsq": {options}}``); they run as bias, lstsq, bn (``fxprune.recover``). Written to
            JSON only when not empty.
    """

    recover: list = field(default_factory=list)

    def validate_budget(self, path: str) -> None:
        super().validate_budget(path)
        validate_recover(self.recover, f"{path}.recover")

    def writes_weights(self) -> bool:
        return bool(self.recover)

    def to_dict(self) -> dict[str, Any]:
        """As ``Stage.to_dict``; ``recover`` only when not empty (recipes written before the field existed keep
        their exact form)."""
        out = super().to_dict()
        if out.get("recover") == []:
            del out["recover"]
        return out


__all__ = ["Stage", "PruningStage", "ChannelPruningStage", "RecoveringStage", "register_stage", "stage_class",
           "stage_kinds", "check_fields", "fraction", "is_number", "validate_patterns", "validate_counts",
           "validate_round_to"]
