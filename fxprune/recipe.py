"""Recipes: versioned, self-validating dataclasses that round-trip through dicts, JSON and YAML.

A recipe is a list of stages applied in order. Stage kinds register themselves with ``register_stage``.

Example:
    >>> Recipe.load({"stages": [{"kind": "channels", "target": {"flops": 0.5}}]}).stages[0].criterion
    'l2'
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from .errors import RecipeError

RECIPE_VERSION = 1
_STAGES: dict[str, type] = {}


def register_stage(kind: str):
    """Class decorator registering a stage dataclass under its ``kind``."""

    def deco(cls: type) -> type:
        _STAGES[kind] = cls
        return cls

    return deco


def _check_keys(data: dict, cls: type, path: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{path}.{key}" if path else str(key), f"unknown field{hint}; known: {', '.join(sorted(names))}")


def _fraction(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(path, f"must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise RecipeError(path, f"must be in [0, 1), got {value}")
    return float(value)


def validate_target(stage: Any, path: str) -> None:
    """Check ``stage.target`` (exactly one of ``stage.TARGETS``, a fraction in [0, 1)) and ``stage.criterion``."""
    if not isinstance(stage.target, dict) or len(stage.target) != 1:
        raise RecipeError(f"{path}.target", f"must hold exactly one of {', '.join(stage.TARGETS)}, got {stage.target!r}")
    (key, value), = stage.target.items()
    if key not in stage.TARGETS:
        raise RecipeError(f"{path}.target.{key}", f"unknown target; use one of {', '.join(stage.TARGETS)}")
    stage.target = {key: _fraction(value, f"{path}.target.{key}")}
    from .criteria import get_criterion  # criteria import the recipe module

    get_criterion(stage.criterion, f"{path}.criterion")


def validate_recover_field(stage: Any, path: str) -> None:
    """Check ``stage.recover`` (``fxprune.recover``: a list of ``bn``, ``bias``, ``lstsq``, each at most once)."""
    from .recover import validate_recover  # recovery imports the criteria, which import this module

    validate_recover(stage.recover, f"{path}.recover")


def validate_common(stage: Any, path: str, counts: tuple[str, ...]) -> None:
    """Checks shared by pruning stages: ``ignore``, integer ``counts`` >= 1, ``max_sparsity`` and ``seed``."""
    if not isinstance(stage.ignore, list) or not all(isinstance(p, str) for p in stage.ignore):
        raise RecipeError(f"{path}.ignore", f"must be a list of module-path patterns, got {stage.ignore!r}")
    for name in counts:
        v = getattr(stage, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RecipeError(f"{path}.{name}", f"must be an integer >= 1, got {v!r}")
    m = stage.max_sparsity
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1:
        raise RecipeError(f"{path}.max_sparsity", f"must be in (0, 1), got {m!r}")
    if isinstance(stage.seed, bool) or not isinstance(stage.seed, int):
        raise RecipeError(f"{path}.seed", f"must be an integer, got {stage.seed!r}")


class Targeted:
    """Stages with a validated one-key ``target`` mapping (``{"flops": 0.5}``...)."""

    target: dict

    @property
    def target_kind(self) -> str:
        return next(iter(self.target))

    @property
    def target_value(self) -> float:
        return next(iter(self.target.values()))


@register_stage("channels")
@dataclass
class ChannelStage(Targeted):
    """Remove whole channels (filters, features, groups) and shrink every coupled layer.

    Fields:
        target: exactly one of ``{"sparsity": s}`` (fraction of each group's / all units removed),
            ``{"flops": f}`` (fraction of MACs removed) or ``{"params": p}`` (fraction of parameters removed).
        criterion: name of a registered criterion (``l1``, ``l2``, ``bn_scale``, ``random``, ...).
        scope: ``local`` (same rate in every group), ``global`` (one ranking across groups, scores normalized
            by each group's mean) or ``module`` (one ranking and the same rate per module family, raw scores).
        modules: for ``scope: module``, family name -> glob patterns of module paths (e.g. ``{"mlp": ["*.fc1",
            "*.fc2"]}``); a group belongs to the first family naming a layer that produces its channels (else one
            that reads them). Groups in no family are not pruned.
        ignore: glob patterns of module paths whose channels must not change.
        round_to: kept units per group rounded up to a multiple of this (channel-aware for grouped convs).
        steps: prune in this many equal steps, re-scoring in between.
        max_sparsity: at most this fraction of a group's units is removed.
        seed: seed of random criteria.
        layer_norm: ``freeze`` (default: LayerNorm-normalized dims never prune) or ``renormalize`` (they prune, and
            each pruned LayerNorm/RMSNorm normalizes over its kept channels only; this is how a ViT's embedding
            dim prunes, see ``fxprune/ops/norm_renormalize.py``). Written to JSON only when not the default.
        recover: training-free recovery after pruning, on the ``data`` batches: any of ``bn``, ``bias``,
            ``lstsq`` (they run as bias, lstsq, bn; ``fxprune.recover``). Written to JSON only when not empty.
    """

    kind: str = "channels"
    target: dict = field(default_factory=lambda: {"sparsity": 0.5})
    criterion: str = "l2"
    scope: str = "local"
    modules: dict = field(default_factory=dict)
    ignore: list = field(default_factory=list)
    round_to: int = 1
    steps: int = 1
    max_sparsity: float = 0.9
    seed: int = 0
    layer_norm: str = "freeze"
    recover: list = field(default_factory=list)
    TARGETS: ClassVar[tuple[str, ...]] = ("sparsity", "flops", "params")

    def validate(self, path: str) -> None:
        validate_target(self, path)
        validate_recover_field(self, path)
        if self.layer_norm not in ("freeze", "renormalize"):
            raise RecipeError(f"{path}.layer_norm", f"must be 'freeze' or 'renormalize', got {self.layer_norm!r}")
        if self.scope not in ("local", "global", "module"):
            raise RecipeError(f"{path}.scope", f"must be 'local' or 'global' (or 'module', with modules), got {self.scope!r}")
        if not isinstance(self.modules, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and v and all(isinstance(p, str) for p in v)
                for k, v in self.modules.items()):
            raise RecipeError(f"{path}.modules", f"must map family names to non-empty lists of module-path patterns, "
                                                 f"got {self.modules!r}")
        if self.scope == "module" and not self.modules:
            raise RecipeError(f"{path}.modules", "scope 'module' needs at least one module family")
        validate_common(self, path, ("round_to", "steps"))

    @property
    def analysis_options(self) -> dict[str, str]:
        """Options for ``analyze`` (and recorded in the plan): empty unless ``layer_norm`` is not the default."""
        return {"layer_norm": self.layer_norm} if self.layer_norm != "freeze" else {}



Stage = Union[ChannelStage]


def _stage_dict(stage: Any) -> dict:
    """``dataclasses.asdict`` of a stage; a channel stage's ``layer_norm`` only when not the default ``freeze``, and
    ``recover`` only when not empty (recipes written before the fields existed keep their exact form)."""
    out = dataclasses.asdict(stage)
    if isinstance(stage, ChannelStage) and out.get("layer_norm") == "freeze":
        del out["layer_norm"]
    if out.get("recover") == []:
        del out["recover"]
    return out


def validate_submodule_path(path: Any) -> None:
    """Check the recipe's ``submodule``: ``""`` or a dotted path of attribute names (``backbone``, ``model.body.0``)."""
    if not isinstance(path, str):
        raise RecipeError("submodule", f"must be a dotted module path such as 'backbone' (or '' for the whole model), "
                                       f"got {path!r}")
    if path and not all(part and (part.isidentifier() or part.isdigit()) for part in path.split(".")):
        raise RecipeError("submodule", f"'{path}' is not a dotted module path (names joined by '.', e.g. "
                                       f"'backbone.body')")


@dataclass
class Recipe:
    """An ordered list of stages plus tracing options. ``version`` guards the schema.

    ``submodule`` is the dotted path of the one submodule to prune (e.g. ``"backbone"`` of a torchvision detector,
    see ``fxprune.partial``); ``""`` prunes the whole model. ``leaf_modules`` are then relative to that submodule.
    """

    stages: list = field(default_factory=list)
    version: int = RECIPE_VERSION
    leaf_modules: list = field(default_factory=list)
    submodule: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError("version", f"this fxprune reads recipe version {RECIPE_VERSION}, got {self.version!r}")
        if not isinstance(self.stages, list) or not self.stages:
            raise RecipeError("stages", "must be a non-empty list of stages")
        if not isinstance(self.leaf_modules, list) or not all(isinstance(p, str) for p in self.leaf_modules):
            raise RecipeError("leaf_modules", f"must be a list of module paths or class names, got {self.leaf_modules!r}")
        validate_submodule_path(self.submodule)
        rewriter = None
        for i, stage in enumerate(self.stages):
            if not hasattr(stage, "validate"):
                raise RecipeError(f"stages[{i}]", f"must be a stage, got {type(stage).__name__}")
            stage.validate(f"stages[{i}]")
            # Stages that rewrite the graph (``rewrites_graph = True``: blocksparse, patches) come after every
            # channel-shrinking stage, so a plan replays as "shrink channels, then the rewrites in order".
            if getattr(stage, "rewrites_graph", False):
                rewriter = rewriter or (i, stage.kind)
            elif rewriter is not None:
                raise RecipeError(f"stages[{i}].kind", f"'{stage.kind}' stages must come before the "
                                  f"'{rewriter[1]}' stage (stages[{rewriter[0]}]), which rewrites the graph")

    # -- conversion ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"version": self.version, "leaf_modules": list(self.leaf_modules),
               "stages": [_stage_dict(s) for s in self.stages]}
        if self.submodule:  # written only when set: whole-model recipes keep their exact form
            out["submodule"] = self.submodule
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError("<root>", f"must be a mapping with 'stages', got {type(data).__name__}")
        if "scope" in data:  # the spelling; at the root it would shadow stages[i].scope (local/global/module)
            raise RecipeError("scope", "unknown field; the submodule to prune is the recipe field 'submodule' "
                              "(e.g. submodule: backbone); 'scope' exists only per stage (stages[i].scope: "
                              "local/global/module)")
        _check_keys(data, cls, "")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError("stages", "must be a non-empty list of stages")
        parsed = []
        for i, s in enumerate(stages):
            path = f"stages[{i}]"
            if not isinstance(s, dict):
                raise RecipeError(path, f"must be a mapping, got {type(s).__name__}")
            kind = s.get("kind", "channels")
            if kind not in _STAGES:
                raise RecipeError(f"{path}.kind", f"unknown stage kind '{kind}'; available: {', '.join(sorted(_STAGES))}")
            _check_keys(s, _STAGES[kind], path)
            parsed.append(_STAGES[kind](**s))
        return cls(stages=parsed, version=data.get("version", RECIPE_VERSION),
                   leaf_modules=data.get("leaf_modules", []), submodule=data.get("submodule", ""))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Recipe":
        p = Path(path)
        try:
            found = p.is_file()
        except OSError:  # e.g. a name too long for the file system
            found = False
        if not found:
            raise RecipeError("<file>", f"recipe file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text())  # JSON is a subset of YAML
        except yaml.YAMLError as exc:
            raise RecipeError("<file>", f"recipe file '{p}' is not valid YAML/JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, recipe: Union["Recipe", dict, str, Path]) -> "Recipe":
        """Accept a ``Recipe``, a dict, a path to a YAML/JSON file, or YAML/JSON text (a string that parses to a
        mapping)."""
        if isinstance(recipe, Recipe):
            recipe.validate()
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        if isinstance(recipe, str):  # a path parses to a plain string, recipe text to a mapping
            try:
                text = yaml.safe_load(recipe)
            except yaml.YAMLError:
                text = None
            if isinstance(text, dict):
                return cls.from_dict(text)
        if isinstance(recipe, (str, Path)):
            return cls.from_file(recipe)
        raise RecipeError("<root>", f"expected a Recipe, dict or file path, got {type(recipe).__name__}")
