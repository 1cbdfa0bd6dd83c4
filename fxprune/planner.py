"""Turn unit scores and a pruning budget into a ``Plan``.

Per group, units are ordered by score (lowest first) and taken greedily while every space keeps at least one
slot and the group keeps ``1 - max_sparsity`` of its units. A budget picks how far down each order to go: the
same fraction in every group (``local``), one threshold on group-normalized scores (``global``), or one
threshold on raw scores per module family, the same fraction in every family (``module``, DIMAP arXiv 2404.13648;
groups in no family are left alone). FLOPs and parameter budgets are met by bisection on that fraction, counting
MACs and parameters at the shrunk sizes. A latency budget (``fxprune.latency.LatencyTable``) is met greedily: the
next ``round_to`` chunk of the group whose score per predicted millisecond saved is lowest goes first, until the
table predicts the target; a chunk's score is scaled by its group's units over the units it would keep (the width
penalty), so that no layer is emptied for its cheap milliseconds while the same scores spread over several layers
would do.
"""
from __future__ import annotations

import fnmatch
import heapq
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .analysis import Analysis
from .errors import BudgetError
from .ir.context import SizeContext
from .ir.space import Space
from .latency import LatencyTable
from .plan import Plan
from .work import Counter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How a ``Planner`` ranks units and how far it may go.

    Fields:
        scope: ``local`` (the same fraction of every group), ``global`` (one ranking over mean-normalized scores)
            or ``module`` (one ranking of raw scores per module family of ``modules``).
        modules: family name -> glob patterns of module paths, for ``scope="module"``.
        max_sparsity: at most this fraction of a group's units is removed.
        round_to: kept units per group rounded up to a multiple of this.
        round_units: ``round_to`` counts units (e.g. heads); by default it counts channels (a unit of a grouped conv
            holds several).
        group_round_to: ``round_to`` of single groups, by ``group_key`` (``round_to: "auto"`` and its replay).
    """

    scope: str = "local"
    modules: Mapping[str, Sequence[str]] = field(default_factory=dict)
    max_sparsity: float = 0.9
    round_to: int = 1
    round_units: bool = False
    group_round_to: Mapping[str, int] = field(default_factory=dict)


def group_key(a: Analysis, g: int) -> str:
    """A name of group ``g`` that stays the same across analyses of one model: its first parameter axis key."""
    keys = [a.spaces[i].key() for i in np.flatnonzero(a.space_group == g) if a.spaces[i].is_param]
    return min(keys) if keys else f"group{g}"


@dataclass
class GroupOrder:
    """The removal order of one group's units and what the budget allows of it."""

    group: int
    order: np.ndarray  # unit ids in removal order
    scores: np.ndarray  # normalized scores along the order
    n_units: int  # all units of the group (frozen ones included)
    n_prunable: int
    step: int  # kept units must be a multiple of this (round_to)
    done: int = 0  # units removed from this group by earlier steps


class Planner:
    """Builds plans for one analysis and one set of scores."""

    def __init__(self, analysis: Analysis, scores: np.ndarray, budget: Budget, done: dict[int, int] | None = None,
                 normalize: bool = True, groups: Collection[int] | None = None,
                 latency: LatencyTable | None = None) -> None:
        """``done[group]``: units earlier steps removed from a group; ``local`` fractions then count them.
        ``normalize=False``: the scores are already comparable across groups (``global`` uses them as they are).
        ``groups``: plan only these groups (e.g. the attention-head groups); default every prunable group.
        ``latency``: the lookup table of ``analysis``'s graph, for ``latency`` budgets.
        """
        self.a = analysis
        self.latency = latency
        self.normalize = normalize
        self.budget = budget
        self.counts = analysis.unit_space_counts()
        self.counter = Counter(analysis)
        wanted = [g for g in analysis.prunable_groups() if groups is None or g in groups]
        self.orders = [o for o in (self._order(g, scores) for g in wanted) if len(o.order)]
        self.family: dict[int, str] = {}
        if budget.scope == "module":
            self.family = {o.group: f for o in self.orders if (f := self._family(o.group)) is not None}
            left = [o.group for o in self.orders if o.group not in self.family]
            if left:
                log.info("scope 'module': %d prunable groups match no module family and are not pruned", len(left))
            self.orders = [o for o in self.orders if o.group in self.family]
        for o in self.orders:
            o.done = (done or {}).get(o.group, 0)
        all_scores = np.concatenate([o.scores for o in self.orders]) if self.orders else np.zeros(0)
        self.unit_score = np.zeros(analysis.n_units)
        for o in self.orders:
            self.unit_score[o.order] = o.scores
        self.sorted_scores = np.sort(all_scores)

    def _family(self, g: int) -> str | None:
        """The first family naming a layer that produces group ``g``'s channels, else one that reads them."""
        params = [self.a.spaces[i] for i in np.flatnonzero(self.a.space_group == g) if self.a.spaces[i].is_param]
        for produces in (True, False):
            for name, patterns in self.budget.modules.items():
                if any((s.dim == 0 or not produces) and fnmatch.fnmatchcase(s.owner[1:], p)
                       for s in params for p in patterns):
                    return name
        return None

    def _order(self, g: int, scores: np.ndarray) -> GroupOrder:
        a = self.a
        in_group = a.unit_group == g
        units = np.flatnonzero(in_group & ~a.unit_frozen)
        s = np.nan_to_num(scores[units].astype(np.float64), nan=np.inf)
        units = units[np.argsort(s, kind="stable")]
        cap = int(math.floor(self.budget.max_sparsity * len(units) + 1e-9))
        rows = self.counts[units].tocoo()  # rows follow the removal order
        width = int(rows.data.max()) if rows.nnz else 1
        # Units up to the first one that would empty a space need no check: take them at once.
        last = np.full(len(a.spaces), -1)
        np.maximum.at(last, rows.col, rows.row)
        held = np.bincount(rows.col, weights=rows.data, minlength=len(a.spaces))
        emptiable = np.flatnonzero((held >= a.sizes) & (held > 0))
        first_empty = int(last[emptiable].min()) if len(emptiable) else len(units)
        fast = min(first_empty, cap)
        left = a.sizes.copy()
        np.subtract.at(left, rows.col[rows.row < fast], rows.data[rows.row < fast])
        order = list(units[:fast])
        indptr, indices, data = self.counts.indptr, self.counts.indices, self.counts.data
        for u in units[fast:]:
            if len(order) >= cap:
                break
            cols, cnt = indices[indptr[u]:indptr[u + 1]], data[indptr[u]:indptr[u + 1]]
            if np.all(left[cols] - cnt >= 1):
                left[cols] -= cnt
                order.append(u)
        order = np.asarray(order, np.int64)
        mean = float(np.mean(np.abs(scores[units]))) if len(units) else 1.0
        scaled = mean > 0 and np.isfinite(mean) and self.normalize and self.budget.scope != "module"
        norm = scores[order] / (mean if scaled else 1.0)
        r = int(self.budget.group_round_to.get(group_key(a, g), self.budget.round_to))
        step = r if self.budget.round_units else r // math.gcd(r, max(width, 1))
        return GroupOrder(g, order, norm, int(in_group.sum()), len(units), step)

    # -- how many units each group loses at a given fraction q --------------------------------------------------
    def take(self, o: GroupOrder, k: int) -> int:
        """How many units group ``o`` loses when asked for its first ``k``: within its order, and rounded so the
        kept count is a multiple of its ``round_to`` step (which may keep more)."""
        k = max(0, min(k, len(o.order)))
        if o.step > 1 and k > 0:
            kept = o.n_units - k
            kept = min(o.n_units, -(-kept // o.step) * o.step)
            k = o.n_units - kept
        return max(0, min(k, len(o.order)))

    def prefix(self, o: GroupOrder, k: int) -> np.ndarray:
        """The unit ids group ``o`` loses when asked for its first ``k`` (see ``take``)."""
        return o.order[:self.take(o, k)]

    def removed_units(self, q: float) -> np.ndarray:
        """Unit ids removed at fraction ``q`` of the budget axis (0 = nothing, 1 = as much as allowed)."""
        if self.budget.scope == "global":
            total = len(self.sorted_scores)
            kth = int(round(q * sum(o.n_prunable for o in self.orders)))
            kth = min(kth, total)
            if kth == 0:
                return np.zeros(0, np.int64)
            t = self.sorted_scores[kth - 1]
            takes = [self.take(o, int(np.searchsorted(o.scores, t, side="right"))) for o in self.orders]
        elif self.budget.scope == "module":
            takes = [0] * len(self.orders)
            for fam in dict.fromkeys(self.family.values()):
                members = [i for i, o in enumerate(self.orders) if self.family[o.group] == fam]
                ranked = np.sort(np.concatenate([self.orders[i].scores for i in members]))
                kth = min(int(round(q * sum(self.orders[i].n_prunable for i in members))), len(ranked))
                for i in members:
                    o = self.orders[i]
                    takes[i] = self.take(o, int(np.searchsorted(o.scores, ranked[kth - 1], side="right"))) if kth else 0
        else:
            takes = [self.take(o, int(math.floor(q * (o.n_prunable + o.done) + 1e-9)) - o.done) for o in self.orders]
        parts = [o.order[:k] for o, k in zip(self.orders, takes)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def new_sizes(self, removed: np.ndarray) -> dict[Space, int]:
        mask = np.zeros(self.a.n_units, np.int64)
        mask[removed] = 1
        lost = self.counts.T @ mask
        return {self.a.spaces[i]: int(self.a.sizes[i] - lost[i]) for i in np.flatnonzero(lost)}

    def reduction(self, removed: np.ndarray, metric: str) -> float:
        """Fraction of ``metric`` (``macs``, ``params`` or ``latency``, predicted by the table) removed."""
        if metric == "latency":
            table = self._table()
            return 1.0 - table.predict(self.new_sizes(removed)) / table.base_ms if table.base_ms else 0.0
        return self.counter.reduction(self.new_sizes(removed), metric)

    def _table(self) -> LatencyTable:
        if self.latency is None:
            raise BudgetError("a latency target needs the latency lookup table (Planner(latency=...))")
        return self.latency

    def solve(self, target_kind: str, target: float) -> np.ndarray:
        """Removed units meeting the target (a sparsity fraction, or a fraction of MACs / params removed)."""
        if target == 0 or not self.orders:
            if target > 0:
                raise BudgetError(f"{target_kind} target {target:.3f} cannot be met: no prunable channel group "
                                  f"(every group is frozen; see the report)")
            return np.zeros(0, np.int64)
        if target_kind == "sparsity":
            return self.removed_units(target)
        if target_kind == "latency":
            return self._solve_latency(target)
        metric = "macs" if target_kind == "flops" else "params"
        best = self.reduction(self.removed_units(1.0), metric)
        if best + 1e-9 < target:
            raise BudgetError(
                f"{target_kind} target {target:.3f} cannot be met: at most {best:.3f} of the model's {metric} can be "
                f"removed (max_sparsity={self.budget.max_sparsity}, frozen groups and ignored modules excluded)")
        lo, hi = 0.0, 1.0
        for _ in range(32):
            mid = (lo + hi) / 2
            if self.reduction(self.removed_units(mid), metric) >= target:
                hi = mid
            else:
                lo = mid
        below, above = self.removed_units(lo), self.removed_units(hi)
        if self.budget.round_to > 1 or any(o.step > 1 for o in self.orders):
            return above
        # Many groups cross a step at the same fraction: add the units between ``lo`` and ``hi`` one by one,
        # lowest normalized score first (each group still loses a prefix of its order), to land on the target.
        extra = np.setdiff1d(above, below)
        extra = extra[np.argsort(self.unit_score[extra], kind="stable")]
        a, b = 0, len(extra)
        while a < b:
            m = (a + b) // 2
            if self.reduction(np.concatenate([below, extra[:m]]), metric) >= target:
                b = m
            else:
                a = m + 1
        chosen = np.concatenate([below, extra[:a]])
        if a > 0 and self.reduction(chosen, metric) > target + 0.01:
            closer = self._closer(np.concatenate([below, extra[:a - 1]]), target, metric)
            chosen = closer if closer is not None else chosen
        return chosen

    def _closer(self, chosen: np.ndarray, target: float, metric: str) -> np.ndarray | None:
        """When the unit that crosses the target overshoots by more than 1%, fill with smaller units instead.

        Candidates are taken lowest score first; a unit is added only if it is next in its group's order (so every
        group still loses a prefix) and the reduction stays within 1% of the target.
        """
        taken = {o.group: int(np.isin(o.order, chosen).sum()) for o in self.orders}
        order_of = {o.group: o.order for o in self.orders}
        pool = np.setdiff1d(np.concatenate([o.order for o in self.orders]), chosen)
        picked = list(chosen)
        for u in pool[np.argsort(self.unit_score[pool], kind="stable")][:128]:
            g = int(self.a.unit_group[u])
            k = taken[g]
            if k >= len(order_of[g]) or order_of[g][k] != u:
                continue
            reached = self.reduction(np.asarray(picked + [u]), metric)
            if reached > target + 0.01:
                continue
            picked.append(u)
            taken[g] = k + 1
            if reached >= target:
                return np.asarray(picked, np.int64)
        return None

    def latency_floor(self) -> np.ndarray:
        """The units the latency greedy removes before it runs out of chunks: the most the table lets go."""
        return self._solve_latency(1.0, strict=False)

    def _solve_latency(self, target: float, strict: bool = True) -> np.ndarray:
        """Greedy on the table: take the next chunk (down to the next multiple of the group's step) of the group
        whose chunk has the lowest normalized score per predicted millisecond saved, times the width penalty
        ``n_units / kept after the chunk``, until the prediction is at or below ``(1 - target)`` of the unpruned one."""
        table, a = self._table(), self.a
        goal = (1.0 - target) * table.base_ms
        sizes = a.sizes.astype(np.int64).copy()
        cur: dict[Space, int] = {}
        ctx = SizeContext(cur, a.param_sizes)
        ms = np.array([table.entry_ms(i, ctx) for i in range(len(table.entries))])
        total = table.residual_ms + table.scale * float(ms.sum())
        taken = [0] * len(self.orders)
        entries_of = [sorted({e for sp in np.unique(self.counts[o.order].indices)
                              for e in table.by_space.get(int(sp), ())}) for o in self.orders]
        groups_of_entry: dict[int, set[int]] = {}
        for i, es in enumerate(entries_of):
            for e in es:
                groups_of_entry.setdefault(e, set()).add(i)

        def chunk(i: int) -> np.ndarray:
            o, k = self.orders[i], taken[i]
            kept = o.n_units - k
            nxt = (kept - 1) // o.step * o.step
            return o.order[k:o.n_units - nxt] if nxt > 0 and o.n_units - nxt <= len(o.order) else o.order[:0]

        def shift(units: np.ndarray, sign: int) -> None:
            rows = self.counts[units]
            lost = np.bincount(rows.indices, weights=rows.data, minlength=len(sizes)).astype(np.int64)
            for sp in np.flatnonzero(lost):
                sizes[sp] -= sign * lost[sp]
                cur[a.spaces[sp]] = int(sizes[sp])

        def saving(i: int, units: np.ndarray) -> float:
            shift(units, 1)
            new = sum(table.entry_ms(e, ctx) for e in entries_of[i])
            shift(units, -1)
            return float(sum(ms[e] for e in entries_of[i]) - new)

        heap: list[tuple[float, int, int]] = []
        version = [0] * len(self.orders)

        def push(i: int) -> None:
            version[i] += 1
            units = chunk(i)
            if len(units):
                saved = saving(i, units)
                cost = float(np.sum(np.maximum(self.unit_score[units], 0.0)))
                o = self.orders[i]  # the fewer units a group keeps, the more its next ones are worth
                cost *= o.n_units / max(1, o.n_units - taken[i] - len(units))
                if saved > 1e-12 and np.isfinite(cost):
                    heapq.heappush(heap, (cost / saved, i, version[i]))

        for i in range(len(self.orders)):
            push(i)
        while total > goal * (1 + 1e-12) and heap:
            _, i, v = heapq.heappop(heap)
            if v != version[i]:
                continue
            units = chunk(i)
            shift(units, 1)
            taken[i] += len(units)
            touched = set()
            for e in entries_of[i]:
                new = table.entry_ms(e, ctx)
                total += table.scale * (new - ms[e])
                ms[e] = new
                touched |= groups_of_entry.get(e, set())
            for j in touched | {i}:
                push(j)
        if strict and total > goal * (1 + 1e-9):
            raise BudgetError(f"latency target {target:.3f} cannot be met: the lookup table predicts at most "
                              f"{1 - total / table.base_ms:.3f} of the model's latency can be removed "
                              f"(max_sparsity={self.budget.max_sparsity}, frozen groups and ignored modules excluded; "
                              f"{table.outside_ms:.3f} of its {table.base_ms:.3f} ms are outside the timed layers, "
                              f"{table.residual_ms:.3f} ms of them independent of the widths)")
        parts = [o.order[:k] for o, k in zip(self.orders, taken)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def plan(self, removed: np.ndarray) -> Plan:
        a = self.a
        unit_removed = np.zeros(a.n_units, bool)
        unit_removed[removed] = True
        slot_removed = unit_removed[a.slot_unit]
        kept, sizes = {}, {}
        slot_index = a.slot_index
        for i in np.unique(a.slot_space[slot_removed]):
            lo, hi = a.offsets[i], a.offsets[i] + a.sizes[i]
            key = a.spaces[i].key()
            kept[key] = slot_index[lo:hi][~slot_removed[lo:hi]].tolist()
            sizes[key] = int(a.sizes[i])
        groups = []
        for o in self.orders:
            n = int(unit_removed[a.unit_group == o.group].sum())
            params = [a.spaces[i].key() for i in np.flatnonzero(a.space_group == o.group) if a.spaces[i].is_param]
            groups.append({"params": params, "units": o.n_units, "removed": n})
        return Plan(kept, sizes, groups, frozen_groups(a))


def frozen_groups(a: Analysis) -> list[dict]:
    """Groups holding parameter axes of which no unit may be removed, with the reasons."""
    live = set(np.unique(a.unit_group[~a.unit_frozen]).tolist())
    out = []
    for g in np.unique(a.space_group[[i for i, s in enumerate(a.spaces) if s.is_param]]):
        if int(g) in live:
            continue
        params = [a.spaces[i].key() for i in np.flatnonzero(a.space_group == g) if a.spaces[i].is_param]
        out.append({"params": params, "reasons": a.group_reasons(int(g))[:5]})
    return out
