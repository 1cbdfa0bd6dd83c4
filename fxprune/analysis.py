"""Channel-coupling analysis of a traced graph.

Every op rule states ties between channel slots (see ``coupling.py``). The spaces and their ties form a networkx
graph; its connected components are the *groups*. Inside a group, slots joined by ties form *units*: the atoms
of pruning, each removed all at once. A unit is frozen when any of its slots is frozen (uncovered by a rule,
a model input or output, an ignored module, ...).
"""
from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch.fx as fx
from scipy.sparse.csgraph import connected_components

from .errors import FxPruneError
from .ir.coupling import Coupling, Tie
from .ir.space import Port, Space
from .ops.registry import OpRule, lookup

log = logging.getLogger(__name__)


@dataclass
class _Application:
    node: fx.Node
    rule: OpRule
    coupling: Coupling
    scope: list[Port]
    ignored: str | None = None


@dataclass
class Analysis:
    """The result of coupling analysis: spaces, units (atoms) and groups of one ``GraphModule``."""

    gm: fx.GraphModule
    spaces: list[Space]
    index: dict[Space, int]
    sizes: np.ndarray
    offsets: np.ndarray
    graph: nx.Graph
    slot_unit: np.ndarray  # unit id of every slot
    unit_frozen: np.ndarray  # bool per unit
    space_group: np.ndarray  # group id of every space
    unit_group: np.ndarray  # group id of every unit
    reasons: dict[int, set[str]]  # space index -> why some of its slots are frozen
    param_rules: dict[str, OpRule]  # "@path" -> rule owning that parameter axis
    node_rules: dict[str, OpRule]
    param_sizes: dict[Space, int] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.unit_frozen)

    @property
    def slot_space(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.spaces)), self.sizes)

    @property
    def slot_index(self) -> np.ndarray:
        return np.arange(int(self.sizes.sum())) - np.repeat(self.offsets, self.sizes)

    def unit_space_counts(self) -> sp.csr_matrix:
        """Sparse [units x spaces] matrix: how many slots of each space a unit holds."""
        n = len(self.slot_unit)
        return sp.csr_matrix((np.ones(n, np.int64), (self.slot_unit, self.slot_space)),
                             shape=(self.n_units, len(self.spaces)))

    def group_reasons(self, group: int) -> list[str]:
        spaces = np.flatnonzero(self.space_group == group)
        return sorted({r for s in spaces for r in self.reasons.get(int(s), ())})

    def prunable_groups(self) -> list[int]:
        """Groups with at least one unfrozen unit that holds a parameter axis."""
        has_param = np.zeros(self.space_group.max() + 1, bool)
        for i, s in enumerate(self.spaces):
            if s.is_param:
                has_param[self.space_group[i]] = True
        live = np.unique(self.unit_group[~self.unit_frozen])
        return [int(g) for g in live if has_param[g]]


def _is_ignored(node: fx.Node, patterns: Sequence[str]) -> str | None:
    if node.op != "call_module" or not patterns:
        return None
    return next((p for p in patterns if fnmatch.fnmatchcase(str(node.target), p)), None)


def _collect(gm: fx.GraphModule, ignore: Sequence[str], options: Mapping[str, Any] | None = None) -> list[_Application]:
    nodes = {n.name: n for n in gm.graph.nodes}
    opts = dict(options or {})
    apps = []
    for node in gm.graph.nodes:
        rule = lookup(node, gm)
        c = Coupling(node, gm, nodes=nodes, options=opts)
        try:
            rule.couple(node, c)
            scope = rule.scope(node, c)
        except FxPruneError:
            raise
        except Exception as exc:
            raise FxPruneError(f"op rule '{rule.name}' failed on {node.format_node()}: "
                               f"{type(exc).__name__}: {exc}") from exc
        apps.append(_Application(node, rule, c, scope, _is_ignored(node, ignore)))
    return apps


def _coverage(app: _Application, ties: list[Tie], sizes: dict[Space, int]) -> list[tuple[Space, np.ndarray, str]]:
    """Slots of the app's scope that none of ``ties`` or its frees cover, plus explicit freezes."""
    c = app.coupling
    masks: dict[Space, np.ndarray] = {}
    for port in app.scope:
        for d in range(port.ndim):
            masks[port.space(d)] = np.zeros(port.shape[d], bool)
    for t in ties:
        if t.a in masks:
            masks[t.a][t.ia] = True
        if t.b in masks:
            masks[t.b][t.ib] = True
    for space, idx in c.freed:
        if space in masks:
            masks[space][slice(None) if idx is None else idx] = True
    frozen = [(s, np.flatnonzero(~m), app.rule.frozen_reason(app.node, s)) for s, m in masks.items() if not m.all()]
    for space, idx, reason in c.frozen:
        frozen.append((space, np.arange(sizes[space]) if idx is None else np.asarray(idx), reason))
    if app.ignored:
        reason = f"module '{app.node.target}' ignored by recipe pattern '{app.ignored}'"
        for s in list(masks) + list(c.param_sizes):
            frozen.append((s, np.arange(sizes[s]), reason))
    return frozen


def _components(ties: list[Tie], index: dict[Space, int], offsets: np.ndarray, n_slots: int) -> np.ndarray:
    if ties:
        u = np.concatenate([offsets[index[t.a]] + t.ia for t in ties])
        v = np.concatenate([offsets[index[t.b]] + t.ib for t in ties])
    else:
        u = v = np.zeros(0, np.int64)
    adj = sp.coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(n_slots, n_slots))
    return connected_components(adj, directed=False)[1]


def analyze(gm: fx.GraphModule, ignore: Sequence[str] = (), options: Mapping[str, Any] | None = None) -> Analysis:
    """Couple the channels of ``gm`` (whose nodes carry recorded shapes) into groups and units.

    Args:
        gm: a traced module after ``record_shapes``.
        ignore: glob patterns of module paths whose channels must not change.
        options: analysis options every op rule can read as ``Coupling.options`` (``None``: the defaults), e.g.
            ``{"layer_norm": "renormalize"}`` (see ``ops/norm_renormalize.py``).
    """
    apps = _collect(gm, ignore, options)
    sizes: dict[Space, int] = {}
    param_rules: dict[str, OpRule] = {}
    for app in apps:
        for port in app.scope:
            for d, n in enumerate(port.shape):
                sizes[port.space(d)] = n
        for s, n in app.coupling.param_sizes.items():
            sizes[s] = n
            param_rules[s.owner] = app.rule
        for t in app.coupling.ties + [t for opts in app.coupling.choices for o in opts for t in o]:
            for s in (t.a, t.b):
                if s not in sizes:
                    sizes[s] = app.coupling.size(s)
    spaces = list(sizes)
    index = {s: i for i, s in enumerate(spaces)}
    size_arr = np.array([sizes[s] for s in spaces], np.int64)
    offsets = np.concatenate([[0], np.cumsum(size_arr)[:-1]]).astype(np.int64) if spaces else np.zeros(0, np.int64)
    n_slots = int(size_arr.sum())

    firm = [t for app in apps for t in app.coupling.ties]
    chosen: dict[int, list[Tie]] = {}
    if any(app.coupling.choices for app in apps):
        frozen0 = np.zeros(n_slots, bool)
        for app in apps:
            extra = [t for opts in app.coupling.choices for o in opts for t in o]
            for s, idx, _ in _coverage(app, app.coupling.ties + extra, sizes):
                frozen0[offsets[index[s]] + idx] = True
        labels0 = _components(firm, index, offsets, n_slots)
        unit_frozen0 = np.bincount(labels0, weights=frozen0, minlength=labels0.max() + 1) > 0
        for k, app in enumerate(apps):
            picks = []
            for options in app.coupling.choices:
                def cost(o: list[Tie]) -> tuple[float, int]:
                    slots = np.concatenate([offsets[index[t.b]] + t.ib for t in o])
                    return float(unit_frozen0[labels0[slots]].mean()), -sizes[o[0].b]
                picks.extend(min(options, key=cost))
            chosen[k] = picks
    frozen = np.zeros(n_slots, bool)
    reasons: dict[int, set[str]] = defaultdict(set)
    for k, app in enumerate(apps):
        for s, idx, reason in _coverage(app, app.coupling.ties + chosen.get(k, []), sizes):
            if len(idx):
                frozen[offsets[index[s]] + idx] = True
                reasons[index[s]].add(reason)
    all_ties = firm + [t for picks in chosen.values() for t in picks]
    labels = _components(all_ties, index, offsets, n_slots)
    n_units = int(labels.max()) + 1 if n_slots else 0
    unit_frozen = np.bincount(labels, weights=frozen, minlength=n_units) > 0

    graph = nx.Graph()
    graph.add_nodes_from(range(len(spaces)))
    for t in all_ties:
        a, b = index[t.a], index[t.b]
        if graph.has_edge(a, b):
            graph.edges[a, b]["maps"].append((t.ia, t.ib))
        else:
            graph.add_edge(a, b, maps=[(t.ia, t.ib)])
    space_group = np.zeros(len(spaces), np.int64)
    for g, comp in enumerate(nx.connected_components(graph)):
        space_group[list(comp)] = g
    slot_space = np.repeat(np.arange(len(spaces)), size_arr)
    unit_group = np.zeros(n_units, np.int64)
    unit_group[labels] = space_group[slot_space]
    return Analysis(
        gm=gm, spaces=spaces, index=index, sizes=size_arr, offsets=offsets, graph=graph, slot_unit=labels,
        unit_frozen=unit_frozen, space_group=space_group, unit_group=unit_group, reasons=dict(reasons),
        param_rules=param_rules, node_rules={a.node.name: a.rule for a in apps},
        param_sizes={s: sizes[s] for s in spaces if s.is_param},
    )
