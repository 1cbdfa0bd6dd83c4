"""Recipes: versioned, self-validating dataclasses that round-trip through dicts, JSON and YAML.

A recipe is a list of stages applied in order. Stage kinds register themselves with
``fxprune.stages.register_stage``; each kind's class parses, validates and writes its own fields.

Example:
    >>> Recipe.load({"stages": [{"kind": "channels", "target": {"flops": 0.5}}]}).stages[0].criterion
    'l2'
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError
from .stages.base import Stage, check_fields, stage_class

RECIPE_VERSION = 1


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
    see ``fxprune.submodule``); ``""`` prunes the whole model. ``leaf_modules`` are then relative to that submodule.
    ``strict_trace`` makes an untraceable submodule an error instead of an automatic leaf (``fxprune.capture``).
    """

    stages: list = field(default_factory=list)
    version: int = RECIPE_VERSION
    leaf_modules: list = field(default_factory=list)
    submodule: str = ""
    strict_trace: bool = False

    def __post_init__(self) -> None:
        self.validate()
        self.stages = [s.normalized() for s in self.stages]

    def validate(self) -> None:
        """Raise ``RecipeError`` naming the field unless the recipe and every stage are valid (changes nothing)."""
        if self.version != RECIPE_VERSION:
            raise RecipeError("version", f"this fxprune reads recipe version {RECIPE_VERSION}, got {self.version!r}")
        if not isinstance(self.stages, list) or not self.stages:
            raise RecipeError("stages", "must be a non-empty list of stages")
        if not isinstance(self.leaf_modules, list) or not all(isinstance(p, str) for p in self.leaf_modules):
            raise RecipeError("leaf_modules", f"must be a list of module paths or class names, "
                                              f"got {self.leaf_modules!r}")
        validate_submodule_path(self.submodule)
        if not isinstance(self.strict_trace, bool):
            raise RecipeError("strict_trace", f"must be true or false, got {self.strict_trace!r}")
        rewriter = None
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise RecipeError(f"stages[{i}]", f"must be a stage, got {type(stage).__name__}")
            stage.validate(f"stages[{i}]")
            # Stages that rewrite the graph (``rewrites_graph = True``: blocksparse, patches) come after every
            # channel-shrinking stage, so a plan replays as "shrink channels, then the rewrites in order".
            if stage.rewrites_graph:
                rewriter = rewriter or (i, stage.kind)
            elif rewriter is not None:
                raise RecipeError(f"stages[{i}].kind", f"'{stage.kind}' stages must come before the "
                                  f"'{rewriter[1]}' stage (stages[{rewriter[0]}]), which rewrites the graph")

    # -- conversion ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"version": self.version, "leaf_modules": list(self.leaf_modules),
               "stages": [s.to_dict() for s in self.stages]}
        if self.submodule:  # written only when set: whole-model recipes keep their exact form
            out["submodule"] = self.submodule
        if self.strict_trace:
            out["strict_trace"] = True
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError("<root>", f"must be a mapping with 'stages', got {type(data).__name__}")
        if "scope" in data:  # the spelling; at the root it would shadow stages[i].scope (local/global/module)
            raise RecipeError("scope", "unknown field; the submodule to prune is the recipe field 'submodule' "
                              "(e.g. submodule: backbone); 'scope' exists only per stage (stages[i].scope: "
                              "local/global/module)")
        check_fields(data, cls, "")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError("stages", "must be a non-empty list of stages")
        parsed = []
        for i, s in enumerate(stages):
            path = f"stages[{i}]"
            if not isinstance(s, dict):
                raise RecipeError(path, f"must be a mapping, got {type(s).__name__}")
            parsed.append(stage_class(s.get("kind", "channels"), f"{path}.kind").from_dict(s, path))
        return cls(stages=parsed, version=data.get("version", RECIPE_VERSION),
                   leaf_modules=data.get("leaf_modules", []), submodule=data.get("submodule", ""),
                   strict_trace=data.get("strict_trace", False))

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
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
    def load(cls, recipe: Recipe | dict | str | Path) -> Recipe:
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
