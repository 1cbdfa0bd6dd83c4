"""The pruning plan: which indices of every shrunk space survive. Serialisable, composable, replayable.

Analysis and scoring produce a plan; the rewrite pass only applies one (see ``passes/shrink_channels.py``).
Indices always refer to the original (unpruned) model, so multi-step plans compose into one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PlanError
from .ir.space import Space

PLAN_VERSION = 1


@dataclass
class Plan:
    """``kept[space_key]`` = sorted kept indices; ``sizes[space_key]`` = original size of that space.

    ``groups`` and ``frozen`` describe the decisions for reports: pruned groups with their parameter axes and
    unit counts, and frozen groups with the reasons.

    ``rewrites`` lists, in order, the graph rewrites that follow the channel shrink (block sparsity, patch
    gathering...): each entry is a JSON-able dict whose ``"pass"`` names a function registered with
    ``fxprune.passes.replay.register_rewrite``. They are replayed after ``kept`` is applied.

    ``options`` holds the analysis options the plan was made under (``{"layer_norm": "renormalize"}``: LayerNorms
    normalize over their kept channels only, see ``ops/norm_renormalize.py``); replay and the test oracle read them.
    Empty by default, and then not written by ``to_dict`` (plans without options keep their exact form).

    ``round_to`` records the step each group's kept count was rounded to when a stage chose it (``round_to:
    "auto"``), by group key (its first parameter axis); a recipe's ``round_to`` may take this mapping to replay the
    choice. Written only when not empty.
    """

    kept: dict[str, list[int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)
    frozen: list[dict] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    rewrites: list[dict] = field(default_factory=list)
    version: int = PLAN_VERSION
    options: dict[str, str] = field(default_factory=dict)
    round_to: dict[str, int] = field(default_factory=dict)

    def kept_spaces(self) -> dict[Space, np.ndarray]:
        return {Space.parse(k): np.asarray(v, np.int64) for k, v in self.kept.items()}

    @property
    def empty(self) -> bool:
        return not self.kept and not self.rewrites

    def compose(self, later: Plan) -> Plan:
        """The plan equal to applying ``self`` and then ``later`` (whose indices refer to ``self``'s result)."""
        kept = dict(self.kept)
        sizes = dict(self.sizes)
        for key, idx in later.kept.items():
            base = np.asarray(self.kept[key]) if key in self.kept else np.arange(later.sizes[key])
            kept[key] = base[np.asarray(idx, np.int64)].tolist()
            sizes.setdefault(key, later.sizes[key])
        if self.rewrites and later.kept:
            raise PlanError("a channel plan cannot follow graph rewrites: put channel stages before "
                            f"{self.rewrites[-1].get('pass')!r} stages")
        return Plan(kept, sizes, self.groups + later.groups, later.frozen, {**self.stats, **later.stats},
                    self.rewrites + later.rewrites, options={**self.options, **later.options},
                    round_to={**self.round_to, **later.round_to})

    def to_dict(self) -> dict:
        out = {"format": "fxprune.plan", "version": self.version, "kept": self.kept, "sizes": self.sizes,
               "groups": self.groups, "frozen": self.frozen, "stats": self.stats, "rewrites": self.rewrites}
        if self.options:
            out["options"] = dict(self.options)
        if self.round_to:
            out["round_to"] = dict(self.round_to)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != "fxprune.plan":
            raise PlanError("not an fxprune plan (missing format 'fxprune.plan')")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        return cls({k: list(map(int, v)) for k, v in data["kept"].items()}, dict(data["sizes"]),
                   list(data.get("groups", [])), list(data.get("frozen", [])), dict(data.get("stats", {})),
                   [dict(r) for r in data.get("rewrites", [])], options=dict(data.get("options", {})),
                   round_to={k: int(v) for k, v in data.get("round_to", {}).items()})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())
